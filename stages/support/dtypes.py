"""The dtypes a model may compute in, by the names commands take (``--dtype``, ``--reward-dtype``)
and artifacts record (a rollout's ``dtype``). A registry alone, so that the reward options and the
CLI can name them without importing torch; the torch dtype of each is
:data:`stages.policies.base.TORCH_DTYPES`'s. States, log-probs and the loss stay float32 whatever
the models compute in."""

DTYPES = {
    "fp32": "float32",
    "bf16": "bfloat16 (a GPU's choice for SD3.5 and FLUX)",
    "fp16": "float16",
}
