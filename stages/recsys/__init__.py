"""tempflow's second subsystem: offline RL for sequential recommendation (CRR-Transformer,
arXiv:2307.14450), in the same style as the image stages: each stage leaves an artifact on disk.

- :mod:`stages.recsys.data`: logged sessions from MovieLens-100k (the copy the recbole wheel
  ships), RetailRocket or YooChoose files, or the simulator, prepared into one parquet schema;
- :mod:`stages.recsys.model`: the causal transformer policy (GPT-2-shaped) with tied item logits
  and a Q head;
- :mod:`stages.recsys.losses`: CRR, behaviour cloning, SQN and SA2C, as DESIGN.md §8 states them;
- :mod:`stages.recsys.metrics`: full-ranking HR@k and NDCG@k for clicks and purchases;
- :mod:`stages.recsys.simulate`: users with delayed effects, for logging sessions and measuring a
  policy's long-term return online;
- :mod:`stages.recsys.train` and :mod:`stages.recsys.stages`: training windows, the training loop,
  evaluation, model folders, and the stages ``tempflow rec`` runs.
"""
