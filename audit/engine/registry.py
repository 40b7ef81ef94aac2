"""The CAM methods the audit knows, by name: one decorated function each.

    from keras import ops
    from audit.engine.registry import cam_method

    @cam_method("absgrad")
    def absgrad(activations, gradients):
        return ops.relu(ops.sum(ops.abs(gradients) * activations, axis=-1))

A method is a function of the target layer's activations ``A`` and the gradients
``G`` of the target logit with respect to them, both ``(batch, height, width,
channels)``, written in ``keras.ops`` (so it runs on every backend); it returns the
map ``(batch, height, width)`` after a ReLU, never normalised. The decorator records
what the method needs, and every part of the tool reads it from here: the config
(``model.method``) and the CLI (``--method``) accept the name, the engine computes
the method in its one compiled step, counterfactual maps need ``gradients``, and the
trust checks skip the random-logit check for a ``class_agnostic`` method.

* ``gradients=False``: the map ignores the gradients (it has no counterfactual form);
* ``class_agnostic=True``: the map does not depend on the explained class;
* ``forward_passes=True``: the method scores masked forward passes instead; it is
  called with ``images``, ``targets`` and ``forward`` (images -> probabilities) too;
* ``configure``: a factory of the method from the config's options (``score_channels``).

The built-in methods are in ``audit.engine.cam_methods``; their names are read from
its decorators without importing it (nor Keras), so a config error in the method's
name is reported in a moment. A package can add methods through the
``bias_audit.cam_methods`` entry points (name = "module:function"): the module is
imported when the method is used.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BUILT_IN = "audit.engine.cam_methods"
ENTRY_POINTS = "bias_audit.cam_methods"


@dataclass(frozen=True)
class CamSpec:
    """A registered CAM method and what it needs."""

    name: str
    function: Callable
    gradients: bool = True
    class_agnostic: bool = False
    forward_passes: bool = False
    configure: Callable | None = None  # (score_channels=...) -> the method
    aliases: tuple[str, ...] = ()

    def build(self, **options) -> Callable:
        """The method to call, made from the config's options where it takes any."""
        method = self.configure(**options) if self.configure is not None else self.function
        return _tagged(method, self)


_REGISTRY: dict[str, CamSpec] = {}


def _key(name: str) -> str:
    """Names compare without case, dashes or underscores (Grad-CAM++ is gradcam++)."""
    return name.lower().replace("_", "").replace("-", "")


def _tagged(method: Callable, spec: CamSpec) -> Callable:
    with contextlib.suppress(AttributeError):  # a callable that takes no attributes
        method.cam_spec = spec
    return method


def cam_method(
    name: str,
    *,
    gradients: bool = True,
    class_agnostic: bool = False,
    forward_passes: bool = False,
    configure: Callable | None = None,
    aliases: tuple[str, ...] = (),
):
    """Register the decorated function as the CAM method ``name`` (see the module)."""

    def register(function: Callable) -> Callable:
        spec = CamSpec(
            name, function, gradients, class_agnostic, forward_passes, configure, tuple(aliases)
        )
        _REGISTRY[name] = spec
        return _tagged(function, spec)

    return register


def _built_in_decorators() -> dict[str, tuple[str, ...]]:
    """The built-in module's ``@cam_method("name", aliases=(...))`` decorators, name ->
    aliases, read from its source (importing it would import Keras)."""
    path = Path(__file__).with_name(BUILT_IN.rsplit(".", 1)[1] + ".py")
    found = {}
    for node in ast.walk(ast.parse(path.read_text())):
        for decorator in getattr(node, "decorator_list", []):
            if (
                isinstance(decorator, ast.Call)
                and getattr(decorator.func, "id", None) == "cam_method"
                and decorator.args
                and isinstance(decorator.args[0], ast.Constant)
            ):
                aliases = next(
                    (ast.literal_eval(k.value) for k in decorator.keywords if k.arg == "aliases"),
                    (),
                )
                found[decorator.args[0].value] = tuple(aliases)
    return found


def built_in_names() -> list[str]:
    """The built-in methods' names, in their module's order, read without Keras."""
    return list(_built_in_decorators())


def _entry_points():
    from importlib.metadata import entry_points

    return {point.name: point for point in entry_points(group=ENTRY_POINTS)}


def method_names() -> list[str]:
    """Every method's name: the built-in ones first, then any registered since or
    offered through entry points."""
    names = built_in_names()
    for name in [*_REGISTRY, *_entry_points()]:
        if name not in names:
            names.append(name)
    return names


def canonical_name(name: str) -> str:
    """The registered name for ``name`` (any case, dashes, underscores, an alias), or a
    ``ValueError`` listing the methods."""
    key = _key(name)
    for known in method_names():
        if _key(known) == key:
            return known
    aliases = _built_in_decorators() | {spec.name: spec.aliases for spec in _REGISTRY.values()}
    for known, its_aliases in aliases.items():
        if key in map(_key, its_aliases):
            return known
    raise ValueError(f"unknown CAM method {name!r}; choose one of: {', '.join(method_names())}")


def cam_spec(name: str) -> CamSpec:
    """The registered method ``name`` (the built-in module, or an entry point's, imported
    on first use)."""
    name = canonical_name(name)
    if name not in _REGISTRY:
        importlib.import_module(BUILT_IN)
    if name not in _REGISTRY:
        point = _entry_points().get(name)
        if point is not None:
            point.load()  # importing it runs its @cam_method
    if name not in _REGISTRY:
        raise ValueError(f"CAM method {name!r} is named but its module does not register it")
    return _REGISTRY[name]


def spec_of(method: Callable) -> CamSpec:
    """What a method made by ``CamSpec.build`` (or decorated) needs; a plain function
    counts as a gradient method."""
    return getattr(method, "cam_spec", None) or CamSpec(getattr(method, "__name__", "?"), method)
