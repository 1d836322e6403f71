"""Policies: the models tempflow samples and trains, behind one interface (:class:`Policy`).

``base`` holds the interface and the policy folder (config.json, identity, loading); ``tiny`` the
presets built from a config; ``pipeline`` what the real kinds share (a user's diffusers folder,
referred to by path and fingerprint); ``sd3`` and ``flux`` the two real kinds; ``lora`` the adapter
code; ``tiny_pipelines`` genuine diffusers folders of both real kinds at toy size (tests, demos).
A kind's module is imported only when a policy of that kind is used.
"""

from stages.policies.base import (
    DTYPES,
    POLICY_KINDS,
    Cond,
    Policy,
    PolicyRecord,
    dtype_name,
    index_cond,
    load_policy,
    policy_class,
    read_policy_record,
    record_inputs,
    resolve_device,
    resolve_dtype,
    save_policy,
    tensor_hash,
    with_negative,
)
from stages.policies.tiny import (
    DEFAULT_WORDS,
    PRESET_MODELS,
    PRESETS,
    TinyConfig,
    TinyPolicy,
    build_policy,
    model_config,
    prompt_words,
)

__all__ = [
    "DEFAULT_WORDS", "DTYPES", "POLICY_KINDS", "PRESETS", "PRESET_MODELS", "Cond", "Policy", "PolicyRecord",
    "TinyConfig", "TinyPolicy", "build_policy", "dtype_name", "index_cond", "load_policy", "model_config",
    "policy_class", "prompt_words", "read_policy_record", "record_inputs", "resolve_device", "resolve_dtype", "save_policy",
    "tensor_hash", "with_negative",
]
