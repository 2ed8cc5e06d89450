"""RBD extents against their cluster: the image and cluster an extent names, and making the
image what the extent asks for before the change is committed.

``prepare_image`` runs (in a thread: it waits for the cluster) before an RBD extent is
created or its image or size changed, so that a missing pool, a missing image without a
size, an unreachable cluster or a shrink is refused with a clear message under the field
it concerns, instead of an extent that the engine then cannot open.  A size creates a
missing image (with the cluster's default features: exclusive-lock, object-map, fast-diff)
or grows a smaller one; images are never shrunk through the API.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from pyscsi_target.backstore.librbd import Image, create_image, remove_image
from pyscsi_target.backstore.rbd import CONNECTIONS, RbdBackstore, RbdSpec
from pyscsi_target.cluster.rados import ClusterSettings, IoCtx, RadosError
from pyscsi_target.config.errors import ValidationError
from pyscsi_target.config.model import Extent
from pyscsi_target.values import parse_rbd_image, parse_size


def cluster_of(e: Extent, defaults: ClusterSettings) -> ClusterSettings:
    """The extent's cluster settings, each empty one taken from the daemon's."""
    return ClusterSettings(
        conf=e.ceph_conf or defaults.conf,
        client_id=e.ceph_client or defaults.client_id,
        keyring=e.ceph_keyring or defaults.keyring,
        options=defaults.options,
    )


def spec_of(e: Extent, defaults: ClusterSettings) -> RbdSpec:
    name = parse_rbd_image(e.path)
    return RbdSpec(name.pool, name.image, name.namespace, cluster_of(e, defaults))


@dataclass(frozen=True)
class PreparedImage:
    spec: RbdSpec
    size: int  # bytes, now
    created: bool  # made for this change (removed again if the change fails)


def prepare_image(e: Extent, defaults: ClusterSettings) -> PreparedImage:
    """Make the extent's image exist with at least its ``filesize`` (blocking)."""
    spec = spec_of(e, defaults)
    wanted = parse_size(e.filesize or "0")
    try:
        rados = CONNECTIONS.get(spec.cluster)
    except RadosError as exc:
        raise ValidationError({"ceph_conf": [f"Cannot reach the Ceph cluster: {exc}"]}) from exc
    created = False
    try:
        try:
            io = rados.open_ioctx(spec.pool, spec.namespace)
        except RadosError as exc:
            if exc.errno == errno.ENOENT:
                raise ValidationError({"path": [f"The Ceph pool {spec.pool!r} does not exist."]}) from exc
            raise ValidationError({"path": [str(exc)]}) from exc
        with io:
            size = _image_size(io, spec)
            if size is None:
                if not wanted:
                    raise ValidationError({"path": [
                        f"The RBD image {spec.name} does not exist; give a size (filesize) to create it."]})
                try:
                    create_image(io, spec.image, wanted)
                except RadosError as exc:
                    raise ValidationError({"path": [f"Cannot create the RBD image {spec.name}: {exc}"]}) from exc
                created, size = True, wanted
            elif wanted > size:
                image = Image(io, spec.image)
                try:
                    image.resize(wanted)
                finally:
                    image.close()
                size = wanted
            elif wanted and wanted < size:
                raise ValidationError({"filesize": [
                    f"The RBD image is already {size} bytes; extents are never shrunk."]})
            if size % e.blocksize or size < e.blocksize:
                if created:
                    remove_image(io, spec.image)
                raise ValidationError({"filesize": [
                    f"The RBD image's size ({size}) is not a multiple of the block size."]})
    finally:
        CONNECTIONS.put(spec.cluster, rados)
    return PreparedImage(spec, size, created)


def _image_size(io: IoCtx, spec: RbdSpec) -> int | None:
    try:
        image = Image(io, spec.image, read_only=True)
    except RadosError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise ValidationError({"path": [f"Cannot open the RBD image {spec.name}: {exc}"]}) from exc
    try:
        return image.size()
    finally:
        image.close()


def discard_image(prepared: PreparedImage) -> None:
    """Remove an image ``prepare_image`` created, when its change did not take effect."""
    if not prepared.created:
        return
    rados = CONNECTIONS.get(prepared.spec.cluster)
    try:
        with rados.open_ioctx(prepared.spec.pool, prepared.spec.namespace) as io:
            remove_image(io, prepared.spec.image)
    finally:
        CONNECTIONS.put(prepared.spec.cluster, rados)


def image_usage(e: Extent, defaults: ClusterSettings) -> tuple[int, int]:
    """The extent's image size and the bytes backed by RADOS objects (blocking)."""
    backstore = RbdBackstore(spec_of(e, defaults), read_only=True)
    try:
        return backstore.size, backstore.allocated_bytes()
    finally:
        backstore.close()
