"""pyscsi-target: an RFC 7143 iSCSI target with an SPC-4/SBC-3 block device and a REST API."""

__version__ = "0.1.0"
