"""The commands of ``sam-backend`` other than ``serve`` (:mod:`sam_backend.server.app`) and the
exporters (:mod:`sam_backend.export.cli`): each builds what it needs through
:mod:`sam_backend.assembly` and registers itself with ``register_cli(subparsers)``."""
