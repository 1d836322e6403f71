"""Policies: the models tempflow samples and trains, behind one interface (:class:`Policy`).

``base`` holds the interface and the policy folder (config.json, identity, loading); ``tiny`` the
presets built from a config; ``pipeline`` what the real kinds share (a user's diffusers folder,
referred to by path and fingerprint); ``sd3`` and ``flux`` the two real kinds; ``lora`` the adapter
code; ``tiny_pipelines`` genuine diffusers folders of both real kinds at toy size (tests, demos).
A kind's module is imported only when a policy of that kind is used; import each name from its
module (this package imports none of them, so that no import of one policy module loads the others).
"""
