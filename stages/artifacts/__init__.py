"""The on-disk contract between stages (DESIGN.md §4): every artifact's schema, one module each,
built, read and validated only there, each with its version under one key (``schema``):

* :mod:`~stages.artifacts.rollout` — manifest, samples (over :mod:`~stages.artifacts.shards`), embeddings;
* :mod:`~stages.artifacts.rollout_config` — the rollout's config, the options of `tempflow rollout`,
  which the manifest records and is read back through;
* :mod:`~stages.artifacts.scores` — the rewards of a rollout (parquet);
* :mod:`~stages.artifacts.policy` — a policy folder's ``config.json`` and ``pretrain.json``;
* :mod:`~stages.artifacts.optimizer` — AdamW's state beside a policy's weights;
* :mod:`~stages.artifacts.update_record` — an update's ``metrics.json`` and ``update.json``;
* :mod:`~stages.artifacts.evaluation` — an evaluation's ``metrics.json`` and ``results.jsonl``;
* :mod:`~stages.artifacts.loop_state` — a loop folder's ``loop.json``: its run and how far it got;
* :mod:`~stages.artifacts.checkpoints` — the resumable checkpoint folder, of
  :mod:`~stages.artifacts.pretrain_checkpoint` (pretraining) and :mod:`~stages.artifacts.rec_checkpoint`;
* :mod:`~stages.artifacts.sessions`, :mod:`~stages.artifacts.rec_model` — the recommender's;
* :mod:`~stages.artifacts.prompts` — the prompts file a user gives.

:mod:`~stages.artifacts.codecs` holds the file formats they are made of (strict JSON, ``.npy``, PNG,
safetensors, sha256). Where an output lands and how it is swapped in is the I/O layer's
(:mod:`stages.support.outputs`). Nothing is ever unpickled. A file written before its kind carried
a version under ``schema`` (a policy's ``"format"``, an unversioned metrics or optimizer file) is read
as the version it was; one of another version is refused in one line naming the version found.
"""
