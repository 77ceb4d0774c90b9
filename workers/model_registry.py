"""Which model revision each product is served with, as Ray object references to its bytes.

The daemon reads a product's ``current`` revision from its models folder (``model_store.read_bundle``),
``ray.put``s it and publishes the reference here; every scoring actor, on whatever node, loads
its models from these references (``ScoringWorker``), so no node but the daemon's needs the
models folder. A registry outlives the actors' restarts: Ray restarts a dead actor with its
original constructor arguments, which include this registry's handle, not the models, so a
restarted actor asks here and gets the product's current revision, a live enrollment included.

The daemon keeps the registry on its own node (it must outlive any worker node); references
are held in one-element lists, so Ray passes them through without resolving them.
"""

from __future__ import annotations

from typing import Any


class ModelRegistry:
    """Product → ``[ObjectRef]`` of its current bundle, and of its shadow bundle when it has one
    (a Ray actor; plain Python otherwise)."""

    def __init__(self) -> None:
        self.refs: dict[str, list[Any]] = {}
        self.shadow_refs: dict[str, list[Any]] = {}

    def publish(self, product: str, ref: list[Any], shadow_ref: list[Any] | None = None) -> None:
        """Serve ``ref`` (a one-element list holding the ObjectRef of the bundle) for ``product``,
        and ``shadow_ref`` as its shadow model (None: no shadow)."""
        self.refs[product] = ref
        if shadow_ref is None:
            self.shadow_refs.pop(product, None)
        else:
            self.shadow_refs[product] = shadow_ref

    def products(self) -> list[str]:
        return sorted(self.refs)

    def get(self, product: str, shadow: bool = False) -> list[Any] | None:
        """The current (or shadow) bundle's reference (in a list), or None if there is none."""
        return (self.shadow_refs if shadow else self.refs).get(product)
