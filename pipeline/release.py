"""Promote a tested image digest to a release tag by retagging it in ECR: no rebuild, same bytes.

    python -m pipeline promote --repository maskrcnn-sagemaker --digest sha256:... --tag release-1.2

ECR has no "add tag" call; PutImage with the digest's own manifest adds a tag to the existing
image. Tags are immutable, so promoting an existing tag to another digest fails, as it should;
promoting the same digest again is a no-op.
"""

from __future__ import annotations

import logging
import re
from typing import Any

log = logging.getLogger(__name__)

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


class PromotionError(RuntimeError):
    """The digest is unknown or the tag already names another image."""


def promote(ecr: Any, repository: str, digest: str, tag: str) -> str:
    """Tag ``repository@digest`` with ``tag``; returns the digest the tag now names."""
    if not _DIGEST.match(digest):
        raise PromotionError(f"not an image digest: {digest!r}")
    images = ecr.batch_get_image(repositoryName=repository, imageIds=[{"imageDigest": digest}])["images"]
    if not images:
        raise PromotionError(f"{repository}@{digest} does not exist")
    existing = ecr.batch_get_image(repositoryName=repository, imageIds=[{"imageTag": tag}])["images"]
    if existing:
        current: str = existing[0]["imageId"]["imageDigest"]
        if current != digest:
            raise PromotionError(f"{repository}:{tag} already names {current}; tags are immutable")
        log.info("%s:%s already names %s", repository, tag, digest)
        return current
    image = images[0]
    put_args: dict[str, Any] = {
        "repositoryName": repository,
        "imageManifest": image["imageManifest"],
        "imageTag": tag,
        "imageDigest": digest,
    }
    if image.get("imageManifestMediaType"):
        put_args["imageManifestMediaType"] = image["imageManifestMediaType"]
    promoted: str = ecr.put_image(**put_args)["image"]["imageId"]["imageDigest"]
    log.info("tagged %s@%s as %s", repository, promoted, tag)
    return promoted
