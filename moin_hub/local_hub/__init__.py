"""The local Hub: a Hugging Face Hub-compatible HTTP server on loopback, for offline work and tests.

Owns ``server`` (:class:`~moin_hub.local_hub.server.LocalHub`, public as :class:`moin_hub.LocalHub`) and
``storage`` (blobs, immutable commits and refs on disk).

Independent of the rest of moin-hub: it may import :mod:`moin_hub.errors`, :mod:`moin_hub._validators`
and itself, nothing else (today it needs neither). The real ``huggingface_hub`` client talks to it, so
it checks what the client does, not what moin-hub does. The modules here are internal and may change.
"""
