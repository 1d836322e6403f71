"""RecBole's own SASRec on tempflow's split, ranked under tempflow's protocol: the outside reference
for the recommender's benchmark (issue 36).

Three steps, each a subcommand; ``train`` runs in a virtual environment of its own, because RecBole
1.2.1 needs versions of numpy, pandas and setuptools that tempflow's does not pin:

    python3 -m venv .venv-recbole
    .venv-recbole/bin/pip install torch==2.13.0
    .venv-recbole/bin/pip install recbole==1.2.1 "numpy<2" "pandas<3" "setuptools<81"

    .venv/bin/python examples/recsys/recbole_sasrec.py export --data SESSIONS.parquet --out DIR
    .venv-recbole/bin/python examples/recsys/recbole_sasrec.py train --dir DIR --seed 0 --epochs 12 --patience 3
    .venv/bin/python examples/recsys/recbole_sasrec.py rank --data SESSIONS.parquet --dir DIR --seed 0 --out EVAL.json

``export`` writes the prepared sessions as a RecBole atomic file: one user per session, the items
numbered as tempflow numbers them, and each event's position in its session as its timestamp, so
that RecBole's leave-one-out split (``LS: valid_and_test``, time order) takes exactly tempflow's last
event as the test target and the one before as validation, ties in time already ordered as tempflow
orders them. ``train`` fits SASRec (RecBole's implementation and trainer, cross-entropy over all
items, early stopping on validation NDCG@10 as RecBole measures it) and saves each test user's
scores over all items, in tempflow's item numbering, and a record of the training
(``train-sN.json``: the validation curve, the epoch kept, seconds). ``rank`` ranks those scores with
``stages.recsys.metrics`` under the chosen protocol (seen items removed by default) and writes a
record of `tempflow rec eval`'s form, so that the benchmark compares SASRec with tempflow's models
target by target.

Why the patches in ``train``: torch 2.6 and later load checkpoints with ``weights_only=True``, and
RecBole's checkpoint holds its config object, so its trainer's reload of the best epoch fails;
``train`` restores the old default for RecBole's own calls (its checkpoints are its own files).
RecBole writes its ``log/`` and ``log_tensorboard/`` into the working directory: ``train`` runs in
``DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

DATASET = "tempflow-sessions"
SASREC = {  # RecBole's SASRec defaults (its model yaml), cross-entropy over every item
    "hidden_size": 64, "inner_size": 256, "n_layers": 2, "n_heads": 2, "hidden_dropout_prob": 0.5,
    "attn_dropout_prob": 0.5, "hidden_act": "gelu", "layer_norm_eps": 1e-12, "initializer_range": 0.02,
    "loss_type": "CE", "MAX_ITEM_LIST_LENGTH": 50,
}


def export(args: argparse.Namespace) -> None:
    """The sessions as ``DIR/tempflow-sessions/tempflow-sessions.inter``, positions as timestamps."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from stages.artifacts.sessions import read_sessions

    sessions = read_sessions(args.data)
    folder = args.out / DATASET
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    lines += [f"{s}\t{i}\t{p}" for s, i, p in zip(sessions.session, sessions.item, sessions.position)]
    (folder / f"{DATASET}.inter").write_text("\n".join(lines) + "\n")
    (args.out / "export.json").write_text(json.dumps({"data": str(args.data), "events": len(sessions.item),
                                                      "sessions": int(sessions.session.max()) + 1,
                                                      "items": sessions.n_items}, indent=2) + "\n")
    print(f"wrote {folder}/{DATASET}.inter: {len(sessions.item)} events")


def _recbole_config(args: argparse.Namespace) -> dict:
    return {
        "device": "cpu", "use_gpu": False, "gpu_id": "", "worker": 0, "seed": args.seed, "reproducibility": True,
        "show_progress": False, "log_wandb": False, "checkpoint_dir": str(args.dir / f"checkpoints-s{args.seed}"),
        "data_path": str(args.dir), "field_separator": "\t", "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id",
        "TIME_FIELD": "timestamp", "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "rm_dup_inter": None, "val_interval": None, "user_inter_num_interval": None, "item_inter_num_interval": None,
        "normalize_all": False,
        **SASREC,
        "epochs": args.epochs, "stopping_step": args.patience, "train_batch_size": args.batch_size,
        "learner": "adam", "learning_rate": args.learning_rate, "train_neg_sample_args": None, "eval_step": 1,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
        "repeatable": True, "metrics": ["Hit", "NDCG"], "topk": [5, 10, 20], "valid_metric": "NDCG@10",
        "eval_batch_size": 4096,
    }


def train(args: argparse.Namespace) -> None:
    """SASRec fitted by RecBole; each test user's scores over all items saved in tempflow's numbering."""
    import functools
    import warnings

    import numpy as np
    import torch

    warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
    torch.set_num_threads(args.threads)
    load = torch.load

    @functools.wraps(load)
    def load_recbole_checkpoint(*a, **kw):  # RecBole's own checkpoint, which pickles its config
        kw.setdefault("weights_only", False)
        return load(*a, **kw)

    torch.load = load_recbole_checkpoint
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_logger, init_seed

    os.chdir(args.dir)  # RecBole's logs land in the working directory
    for folder in ("log/SASRec", "log_tensorboard"):  # RecBole's check-then-create races between two seeds' runs
        Path(folder).mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    config = Config(model="SASRec", dataset=DATASET, config_dict=_recbole_config(args))
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model("SASRec")(config, train_data._dataset).to("cpu")
    trainer = get_trainer(config["MODEL_TYPE"], "SASRec")(config, model)
    curve: list[float] = []  # RecBole's validation NDCG@10 after each epoch
    best_valid, _ = trainer.fit(train_data, valid_data, saved=True, show_progress=False,
                                callback_fn=lambda epoch, score: curve.append(float(score)))
    test = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
    tokens = test_data._dataset.field2id_token
    ours = np.array([0] + [int(t) for t in tokens["item_id"][1:]])  # RecBole's column j is tempflow's item ours[j]
    users, rows = [], []
    trainer.model.eval()
    with torch.no_grad():
        for interaction, history, _, _ in test_data:
            assert history is None, "RecBole masks no history for a sequential model"
            scores = trainer.model.full_sort_predict(interaction).view(len(interaction), -1)
            mapped = torch.full((scores.shape[0], int(ours.max()) + 1), -torch.inf)
            mapped[:, torch.from_numpy(ours[1:])] = scores[:, 1:]
            rows.append(mapped.numpy())
            users += [int(t) for t in test_data._dataset.id2token("user_id", interaction["user_id"])]
    order = np.argsort(users)
    np.save(args.dir / f"scores-s{args.seed}.npy", np.concatenate(rows)[order].astype(np.float32))
    record = {"seed": args.seed, "best_valid_ndcg@10": float(best_valid), "recbole_test": dict(test),
              "seconds": time.perf_counter() - began, "config": _recbole_config(args),
              "epochs_run": len(trainer.train_loss_dict), "threads": args.threads, "validation_ndcg@10": curve,
              "selected_epoch": len(curve) - curve[::-1].index(max(curve))}  # RecBole keeps the last of equal
    # best scores (its early_stopping updates on >=, and its metrics are rounded to 4 decimals); from 1
    (args.dir / f"train-s{args.seed}.json").write_text(json.dumps(record, indent=2, default=float) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "config"}, indent=2, default=float))


def rank(args: argparse.Namespace) -> None:
    """The saved scores ranked as `tempflow rec eval` ranks a model's logits, written in its form with
    what train's record says of the training (epochs run, the epoch kept, seconds)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import numpy as np
    import torch

    from stages.artifacts.rec_model import write_rec_eval
    from stages.artifacts.sessions import read_sessions
    from stages.recsys.metrics import ranks, seen_mask
    from stages.recsys.train import eval_record, eval_targets

    sessions = read_sessions(args.data)
    targets = eval_targets(sessions, "test", context=0)
    scores = torch.from_numpy(np.load(args.dir / f"scores-s{args.seed}.npy"))
    if scores.shape != (len(targets.pairs), sessions.n_items + 1):
        raise SystemExit(f"scores of shape {tuple(scores.shape)}; expected one row per test target of {args.data} "
                         f"and {sessions.n_items + 1} columns: export and train from these sessions")
    seen = seen_mask(targets.seen, scores.shape[1]) if args.protocol == "seen-removed" else None
    rank_of = ranks(scores, torch.tensor([t for _, t in targets.pairs]), seen).numpy()
    record = args.dir / f"train-s{args.seed}.json"
    if not record.is_file():
        raise SystemExit(f"{record} is missing: rank reads the scores and the record that train wrote together")
    trained = json.loads(record.read_text())
    metrics = {"policy": str(args.dir), "algo": "recbole-sasrec", "split": "test", "seed": args.seed,
               **eval_record(rank_of, sessions, targets, args.protocol),
               "training": {"selected_epoch": trained.get("selected_epoch"), "epochs_run": trained["epochs_run"],
                            "seconds": trained["seconds"]}}
    write_rec_eval(args.out, metrics)
    print({k: round(v, 4) for k, v in metrics.items() if k in ("hr@10", "ndcg@10", "purchase_ndcg@10")})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    steps = parser.add_subparsers(dest="step", required=True)
    p = steps.add_parser("export", help="the sessions as a RecBole atomic file")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p = steps.add_parser("train", help="SASRec fitted by RecBole (run in its own venv)")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--patience", type=int, default=10, help="RecBole's stopping_step (validation NDCG@10)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--learning-rate", type=float, default=0.001)
    p.add_argument("--threads", type=int, default=1)
    p = steps.add_parser("rank", help="rank the saved scores under tempflow's protocol")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--protocol", choices=["seen-removed", "all-items"], default="seen-removed")
    p.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if getattr(args, "dir", None) is not None:
        args.dir = args.dir.resolve()
    {"export": export, "train": train, "rank": rank}[args.step](args)


if __name__ == "__main__":
    main()
