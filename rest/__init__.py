"""Management REST API: FreeNAS v1.0 iSCSI resources and Hitachi NAS v9 iscsi-targets."""

from .app import make_app, ssl_context_from_files, start_api

__all__ = ["make_app", "ssl_context_from_files", "start_api"]
