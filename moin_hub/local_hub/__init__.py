"""The local Hub: a Hugging Face Hub-compatible HTTP server on loopback, for offline work and tests.

Owns, split by concern:

- ``server``: :class:`~moin_hub.local_hub.server.LocalHub` (public as :class:`moin_hub.LocalHub`) and the
  HTTP plumbing (connections, request bodies, streamed replies);
- ``protocol``: a parsed request and a reply; ``api``: the routes and who may write where; ``uploads``:
  preupload and the atomic commit endpoint (always "regular" uploads: no LFS); ``cards``: README.md
  front matter checked like the Hub's ``validate-yaml``, and tags;
- ``objects``: repo keys, commits, trees and commit operations, with their pure checks; ``storage``:
  blobs, immutable commits and refs on disk;
- ``faults``: fault injection (status, delay, dropped connections, lost answers) for reliability tests.

Independent of the rest of moin-hub: it may import :mod:`moin_hub.errors`, :mod:`moin_hub._validators`,
:mod:`moin_hub._version` and itself, nothing else (today it needs none of them). The real
``huggingface_hub`` client talks to it, so it checks what the Hub checks, not what moin-hub needs.
The modules here are internal and may change.
"""
