"""Figures of a long run (issue 35): disk against iterations, what an iteration spends outside the
model, and what loading SD3.5 Medium's transformer costs.

    python examples/benchmark/long_run.py disk --out docs/long-run/disk.json
    python examples/benchmark/long_run.py overhead --out docs/long-run/overhead.json
    python examples/benchmark/long_run.py load --out docs/long-run/load.json

disk: examples/sd3's DVC pipeline on a toy SD3.5 folder (`make-tiny sd3`, LoRA r4, 32 px, a rollout of
2 prompts x 2 seeds with K = 2 at each of T = 4 steps), run to 20 iterations, then extended to 100 and 200 (params.yaml edited, `dvc repro` again: the loop continues),
once with the example's retention (policies every 50th and the last, the last 2 rollouts) and once
keeping everything (every policy and rollout). After each run: bytes of the workspace's runs/ and of
.dvc/cache (file sizes; the cache is a copy where the file system has no reflinks), then of the cache
after `dvc gc --workspace` (each repro of a longer run commits the loop folder again, and the earlier
versions stay in the cache until collected).

overhead: on the same toy folder, one iteration as three processes (`tempflow rollout`, `score`,
`update`; wall time of each, and the compute each records of itself) against an iteration inside
`tempflow loop` (the mean of iterations 2..N: the models are loaded in the first). Then what DVC's
own bookkeeping costs: `dvc status` of the default dvc.yaml with `loop.iterations: 1000` (the stages
are the same four at any length).

load: a diffusers folder holding a transformer of SD3.5 Medium's published configuration (random
weights, bf16 safetensors) is written, then loaded with `from_pretrained` as a policy loads it; the
median of --repeats loads, and the throughput in GB/s. The page cache is warm (the file was just
written or read), which is the case of a loop's second load but not of a cold start.

One thread per process; run nothing else meanwhile. Each writes its JSON and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

TEMPFLOW = str(Path(sys.executable).parent / "tempflow")
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
       "OMP_NUM_THREADS": "1", "TEMPFLOW_PROGRESS_SECONDS": "3600"}
TOY = {"init": {"lora-rank": 4, "lora-alpha": 8},
       "rollout": {"num-steps": 10, "resolution": 32, "branches": 4, "prompts-per-rollout": 8, "batch-size": 8},
       "loop": {"dtype": "fp32", "device": "cpu", "threads": 1}}
"""examples/sd3's settings but for the toy's size: 32 px, LoRA r4, the CPU (8 prompts x 2 seeds, K = 4, T = 10)."""


def machine() -> dict:
    names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")] if Path("/proc/cpuinfo").is_file() else []
    return {"cpu": names[0] if names else platform.machine(), "cores": os.cpu_count(), "threads": 1,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}


def size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def run(*cmd: str, cwd: Path) -> float:
    began = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}")
    return time.perf_counter() - began


def toy_base(root: Path) -> Path:
    base = root / "sd3"
    if not base.is_dir():
        run(TEMPFLOW, "make-tiny", "sd3", "--out", str(base), cwd=root)
    return base


def sd3_project(root: Path, name: str, loop: dict) -> Path:
    """examples/sd3 in ``root/name`` on the toy folder, with ``loop``'s values."""
    import yaml

    work = root / name
    work.mkdir()
    shutil.copy(ROOT / ".dvcignore", work / ".dvcignore")
    shutil.copytree(ROOT / ".dvc", work / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp"))
    for folder in ("examples/sd3", "stages", "tempflow_cli"):
        shutil.copytree(ROOT / folder, work / folder, ignore=shutil.ignore_patterns("__pycache__", "runs"))
    path = work / "examples/sd3/params.yaml"
    params = yaml.safe_load(path.read_text())
    params["base"] = str(toy_base(root))
    for group, values in TOY.items():
        params[group].update(values)
    params["loop"].update(loop)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    return work


def set_iterations(work: Path, iterations: int) -> None:
    import yaml

    path = work / "examples/sd3/params.yaml"
    params = yaml.safe_load(path.read_text())
    params["loop"]["iterations"] = iterations
    path.write_text(yaml.safe_dump(params, sort_keys=False))


SMALL = {"num-steps": 4, "branches": 2, "prompts-per-rollout": 2}
"""disk: a smaller rollout (2 prompts x 2 seeds, K = 2, T = 4), so that 200 iterations take minutes here."""


def disk(args: argparse.Namespace, root: Path) -> dict:
    import yaml

    settings = {"retention on (the example's)": {"keep-every": 50, "keep-rollouts": 2},
                "retention off (everything kept)": {"keep-every": 1, "keep-rollouts": 10**6}}
    rows = []
    for label, loop in settings.items():
        work = sd3_project(root, label.split()[1], {**loop, "iterations": args.points[0]})
        path = work / "examples/sd3/params.yaml"
        params = yaml.safe_load(path.read_text())
        params["rollout"].update(SMALL)
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        for iterations in args.points:
            set_iterations(work, iterations)
            seconds = run("dvc", "repro", "examples/sd3/dvc.yaml", cwd=work)
            runs, cache = size(work / "examples/sd3/runs"), size(work / ".dvc/cache")
            run("dvc", "gc", "--workspace", "--force", cwd=work)  # the versions earlier repros committed
            metrics = size(work / "examples/sd3/runs/loop/metrics") + size(work / "examples/sd3/runs/report")
            rows.append({"setting": label, "iterations": iterations, "workspace_bytes": runs, "cache_bytes": cache,
                         "cache_bytes_after_gc": size(work / ".dvc/cache"), "metrics_and_report_bytes": metrics,
                         "total_bytes": runs + cache, "repro_seconds": seconds,
                         "kept_policies": sorted(p.name for p in (work / "examples/sd3/runs/loop/policies").iterdir())})
            print(json.dumps(rows[-1]), flush=True)
    return {"what": "disk in use against iterations, examples/sd3 on a toy SD3.5 folder", "rows": rows}


def overhead(args: argparse.Namespace, root: Path) -> dict:
    import yaml

    work = sd3_project(root, "overhead", {"iterations": 1, "keep-every": 0, "keep-rollouts": 0})
    run("dvc", "repro", "--single-item", "examples/sd3/dvc.yaml:init", cwd=work)
    here = work / "examples/sd3"
    params = yaml.safe_load((here / "params.yaml").read_text())
    rollout = [f"--{k}={v}" for k, v in params["rollout"].items()]
    update = [f"--{k}={v}" for k, v in params["update"].items()]
    score = ["--reward", params["score"]["reward"][0], "--batch-size", str(params["score"]["batch-size"])]
    common = ["--threads", "1"]
    walls = {
        "rollout": run(TEMPFLOW, "rollout", "--policy", "runs/policy0", "--prompts", "prompts.txt", "--out", "runs/r1",
                       "--seed", "1", *rollout, *common, cwd=here),
        "score": run(TEMPFLOW, "score", "--rollout", "runs/r1", "--out", "runs/s1.parquet", *score, *common, cwd=here),
        "update": run(TEMPFLOW, "update", "--policy", "runs/policy0", "--rollout", "runs/r1", "--rewards",
                      "runs/s1.parquet", "--out", "runs/p1", "--seed", "1", *update, *common, cwd=here),
    }
    metrics = json.loads((here / "runs/p1/metrics.json").read_text())
    computed = {"rollout": metrics["rollout_seconds"], "update": metrics["update_seconds"]}
    began = time.perf_counter()
    loop_cmd = [TEMPFLOW, "loop", "--policy", "runs/policy0", "--prompts", "prompts.txt", "--out", "runs/loop",
                "--iterations", str(args.iterations), "--threads", "1", "rollout", *rollout, "+", "score", *score,
                "+", "update", *update]
    proc = subprocess.run(loop_cmd, cwd=here, env=ENV, capture_output=True, text=True)
    loop_wall = time.perf_counter() - began
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    seconds = [float(line.rsplit(", ", 1)[1].split()[0]) for line in proc.stderr.splitlines()
               if line.startswith("iteration ")]
    with tempfile.TemporaryDirectory() as tmp:  # DVC's bookkeeping of a 1,000-iteration default run
        project = Path(tmp) / "project"
        project.mkdir()
        for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
            shutil.copy(ROOT / name, project / name)
        shutil.copytree(ROOT / ".dvc", project / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp"))
        for folder in ("examples", "stages", "tempflow_cli"):
            shutil.copytree(ROOT / folder, project / folder, ignore=shutil.ignore_patterns("__pycache__", "runs"))
        set_params = yaml.safe_load((project / "params.yaml").read_text())
        set_params["loop"]["iterations"] = 1000
        (project / "params.yaml").write_text(yaml.safe_dump(set_params, sort_keys=False))
        subprocess.run(["git", "init", "-q"], cwd=project, check=True)
        bookkeeping = {"dvc_status_seconds": run("dvc", "status", cwd=project)}
    return {
        "what": "one iteration of examples/sd3's settings on a toy SD3.5 folder (32 px, LoRA r4): three processes "
                "against tempflow loop",
        "three_processes": {"wall_seconds": walls, "computed_seconds": computed,
                            "iteration_wall_seconds": sum(walls.values())},
        "loop": {"iterations": args.iterations, "wall_seconds": loop_wall, "first_iteration_seconds": seconds[0],
                 "later_iteration_seconds_mean": statistics.mean(seconds[1:]), "iteration_seconds": seconds},
        "dvc_bookkeeping_1000_iterations": bookkeeping,
    }


def load(args: argparse.Namespace, root: Path) -> dict:
    import torch
    from diffusers import SD3Transformer2DModel

    from examples.benchmark.gpu_sd35 import SD35_MEDIUM

    folder = root / "sd35m" / "transformer"
    torch.manual_seed(0)
    began = time.perf_counter()
    with torch.device("meta"):
        model = SD3Transformer2DModel(**SD35_MEDIUM)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    for param in model.parameters():  # random weights, as a published checkpoint's scale
        param.data.normal_(0.0, 0.02)
    model.save_pretrained(folder, safe_serialization=True)
    written = time.perf_counter() - began
    parameters = sum(p.numel() for p in model.parameters())
    del model
    nbytes = size(folder)
    loads = []
    for _ in range(args.repeats):
        began = time.perf_counter()
        loaded = SD3Transformer2DModel.from_pretrained(folder.parent, subfolder="transformer", torch_dtype=torch.bfloat16,
                                                       local_files_only=True, use_safetensors=True)
        loads.append(time.perf_counter() - began)
        del loaded
    median = statistics.median(loads)
    return {"what": "SD3.5 Medium-shaped transformer (random bf16 weights) loaded with from_pretrained, warm page cache",
            "parameters": parameters, "bytes": nbytes, "write_seconds": written, "load_seconds": loads,
            "load_seconds_median": median, "gb_per_second": nbytes / median / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["disk", "overhead", "load"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--points", type=lambda s: [int(v) for v in s.split(",")], default=[20, 100, 200])
    parser.add_argument("--iterations", type=int, default=4, help="overhead: the loop's iterations")
    parser.add_argument("--repeats", type=int, default=3, help="load: loads timed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tempflow-long-run-") as tmp:
        figures = {"disk": disk, "overhead": overhead, "load": load}[args.what](args, Path(tmp))
    figures["machine"] = machine()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
