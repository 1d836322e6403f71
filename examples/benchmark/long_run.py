"""Figures of a long run (issue 35): disk against iterations, what an iteration spends outside the
model, and what loading SD3.5 Medium's transformer costs.

    python examples/benchmark/long_run.py disk --out docs/long-run/disk.json
    python examples/benchmark/long_run.py overhead --out docs/long-run/overhead.json
    python examples/benchmark/long_run.py load --out docs/long-run/load.json
    python examples/benchmark/long_run.py bytes --before d4c22f2 --photos DIR --out docs/long-run/bytes.json

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

bytes: bytes per trained transition of a rollout at SD3.5 Medium's shapes (16 x 64 x 64 latents, 512 px
images), by this checkout and by the git revision --before (checked out in a worktree), with the same
command line: examples/sd3's rollout settings (T = 10, K = 4 at every step, 2 seeds per prompt,
guidance 4.5) on 2 prompts, on a toy folder of that shape (`make-tiny sd3` with its transformer and
VAE rebuilt for 16 latent channels and a VAE factor of 8; random weights). The shards' bytes are
split by member (each with its tar header and padding). A random VAE draws noise, whose PNGs do not
compress as generated images do, so the figure is also given with the images replaced by photos:
--photos names a folder of natural images (center-cropped to 512 x 512, PNG-encoded with the
rollout's own codec; e.g. scikit-image's data folder), whose mean PNG size stands in for the toy's.

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


SD35_SHAPES_ROLLOUT = ["--num-steps", "10", "--shift", "3.0", "--noise-level", "0.7", "--resolution", "512",
                      "--guidance-scale", "4.5", "--seeds-per-prompt", "2", "--branches", "4", "--branch-steps", "all",
                      "--batch-size", "8", "--samples-per-shard", "64", "--threads", "1"]
PHOTOS = ("astronaut.png", "coffee.png", "motorcycle_left.png", "ihc.png", "chelsea.png", "rocket.jpg")
"""The colour photos of scikit-image's data folder that --photos reads (its other images are gray or tiny)."""


def sd35_shaped_base(root: Path) -> Path:
    """``make-tiny sd3`` with a transformer and VAE of SD3.5 Medium's latent shape: 16 channels, factor 8."""
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    base = root / "sd35-shaped"
    run(TEMPFLOW, "make-tiny", "sd3", "--out", str(base), cwd=root)
    torch.manual_seed(0)
    SD3Transformer2DModel(
        sample_size=64, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
        pos_embed_max_size=64, dual_attention_layers=(0,), qk_norm="rms_norm",
    ).save_pretrained(base / "transformer", safe_serialization=True)
    vae = json.loads((base / "vae/config.json").read_text())
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=16,
                  layers_per_block=1, norm_num_groups=4, sample_size=512, shift_factor=vae["shift_factor"],
                  scaling_factor=vae["scaling_factor"], use_quant_conv=False, use_post_quant_conv=False,
                  ).save_pretrained(base / "vae", safe_serialization=True)
    return base


def member_bytes(rollout: Path) -> dict:
    """Bytes of the rollout's shards by member kind (``state.npy``, ...), each member with its tar
    header and padding; the end-of-archive blocks under ``tar``."""
    import tarfile

    kinds: dict[str, int] = {}
    manifest = json.loads((rollout / "manifest.json").read_text())
    for shard in manifest["shards"]:
        path = rollout / shard["name"]
        with tarfile.open(path) as tar:
            members = tar.getmembers()
        for m in members:
            kind = m.name.partition(".")[2]
            kinds[kind] = kinds.get(kind, 0) + 512 + -(-m.size // 512) * 512
        kinds["tar"] = kinds.get("tar", 0) + path.stat().st_size - sum(512 + -(-m.size // 512) * 512 for m in members)
    return {"samples": manifest["samples"], "schema": manifest["schema"], "shard_bytes": sum(kinds.values()),
            "by_member": kinds}


def photo_codecs(folder: Path) -> dict:
    """Each photo of ``folder``, center-cropped and resized to 512 x 512: its bytes and encoding time
    as PNG by the rollout's codec, and as lossless WebP (method 1), the tighter lossless format
    Pillow carries (each checked to decode to the same pixels)."""
    import io

    import numpy as np
    from PIL import Image

    from stages.artifacts.codecs import png_bytes

    def webp(image: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="WEBP", lossless=True, method=1, quality=50)
        return buf.getvalue()

    out: dict = {"png_bytes": [], "webp_bytes": [], "png_ms": [], "webp_ms": []}
    for name in PHOTOS:
        with Image.open(folder / name) as img:
            img = img.convert("RGB")
            side = min(img.size)
            left, top = (img.width - side) // 2, (img.height - side) // 2
            image = np.asarray(img.crop((left, top, left + side, top + side)).resize((512, 512), Image.BICUBIC))
        for codec, encode in (("png", png_bytes), ("webp", webp)):
            began = time.perf_counter()
            data = encode(image)
            out[f"{codec}_ms"].append((time.perf_counter() - began) * 1e3)
            out[f"{codec}_bytes"].append(len(data))
            with Image.open(io.BytesIO(data)) as back:
                assert np.array_equal(np.asarray(back.convert("RGB")), image), (name, codec)
    return out


def same_transitions(before: Path, after: Path) -> dict:
    """Whether the two rollouts hold the same transitions: per key, x_k, x_(k+1) (read back from the
    new layout), the log-prob and the image bytes; the old layout read from its tar members."""
    import io
    import tarfile

    import numpy as np

    from stages.artifacts.rollout import Rollout

    old: dict[str, dict[str, bytes]] = {}
    for shard in json.loads((before / "manifest.json").read_text())["shards"]:
        with tarfile.open(before / shard["name"]) as tar:
            for m in tar.getmembers():
                key, _, field = m.name.partition(".")
                old.setdefault(key, {})[field] = tar.extractfile(m).read()
    differ, compared = [], 0
    with Rollout(after) as rollout:
        for s in rollout.samples():
            was = old.pop(s.key)
            same = (np.load(io.BytesIO(was["state.npy"])).tobytes() == s.state().tobytes()
                    and np.load(io.BytesIO(was["next.npy"])).tobytes() == s.next().tobytes()
                    and json.loads(was["meta.json"])["log_prob"] == s.meta["log_prob"]
                    and was.get("image.png") == s.fields.get("image.png"))
            compared += 1
            if not same:
                differ.append(s.key)
    return {"compared": compared, "differ": differ, "only_before": sorted(old)}


def rollout_bytes(args: argparse.Namespace, root: Path) -> dict:
    base = sd35_shaped_base(root)
    (root / "prompts.txt").write_text("a red cat on a blue chair\ntwo green apples and a yellow banana\n")
    policy = root / "policy"
    run(TEMPFLOW, "init", "--from", str(base), "--out", str(policy), "--lora-rank", "4", "--lora-alpha", "8", cwd=root)
    before = root / "before"
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(before), args.before], cwd=ROOT, check=True)
    figures: dict = {"what": "bytes per trained transition at SD3.5 Medium's shapes, same rollout command",
                     "command": ["tempflow", "rollout", *SD35_SHAPES_ROLLOUT], "before_revision": args.before}
    try:
        for name, code in (("before", before), ("after", ROOT)):
            out = root / f"rollout-{name}"
            env = {**ENV, "PYTHONPATH": str(code)}
            cmd = [sys.executable, "-m", "tempflow_cli.main", "rollout", "--policy", str(policy),
                   "--prompts", str(root / "prompts.txt"), "--out", str(out), *SD35_SHAPES_ROLLOUT]
            proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{name}: {' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}")
            figures[name] = member_bytes(out)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, check=False)
    for name in ("before", "after"):
        part = figures[name]
        part["per_transition"] = part["shard_bytes"] / part["samples"]
        part["per_transition_without_images"] = (part["shard_bytes"] - part["by_member"].get("image.png", 0)) / part["samples"]
    figures["ratio"] = figures["after"]["per_transition"] / figures["before"]["per_transition"]
    figures["same_transitions"] = same_transitions(root / "rollout-before", root / "rollout-after")
    if args.photos:
        figures["photos"] = photo_codecs(args.photos)
        image = statistics.mean(-(-s // 512) * 512 + 512 for s in figures["photos"]["png_bytes"])  # with its tar header
        figures["photos"]["mean_member_bytes"] = image
        for name in ("before", "after"):
            figures[name]["per_transition_with_photos"] = figures[name]["per_transition_without_images"] + image
        figures["ratio_with_photos"] = (figures["after"]["per_transition_with_photos"]
                                        / figures["before"]["per_transition_with_photos"])
    figures["next_state_ms"] = next_state_cost()
    return figures


def next_state_cost(repeats: int = 200) -> float:
    """Milliseconds a reader spends making one x_(k+1) of SD3.5 Medium's shape from its mean (the noise
    redrawn, the sum, the digest checked), which a rollout also spends once per sample to check it."""
    import numpy as np
    import torch

    from stages.artifacts.rollout import next_state, state_digest

    torch.set_num_threads(1)
    mean = np.random.default_rng(0).standard_normal((16, 64, 64)).astype(np.float32)
    began = time.perf_counter()
    for seed in range(repeats):
        state_digest(next_state(mean, 0.3, seed))
    return (time.perf_counter() - began) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["disk", "overhead", "load", "bytes"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--points", type=lambda s: [int(v) for v in s.split(",")], default=[20, 100, 200])
    parser.add_argument("--iterations", type=int, default=4, help="overhead: the loop's iterations")
    parser.add_argument("--repeats", type=int, default=3, help="load: loads timed")
    parser.add_argument("--before", default="d4c22f2", help="bytes: the git revision to compare with")
    parser.add_argument("--photos", type=Path, help="bytes: a folder holding scikit-image's colour photos")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tempflow-long-run-") as tmp:
        figures = {"disk": disk, "overhead": overhead, "load": load, "bytes": rollout_bytes}[args.what](args, Path(tmp))
    figures["machine"] = machine()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
