"""Model specs: what `ampray train` needs to know of a model, for the built-in zoo and the user's own.

A `ModelSpec` is a factory (options -> nn.Module), a loss `criterion(output, target) -> 0-d tensor`, the
data it takes by default (the columns of ampray's own Parquet schema and the built-in corpus) and, when
known, a flops estimate. The built-in kinds (`mlp`, `cnn`, `gpt`) are named entries; a user's model is a
spec built from import paths (`model.factory = "mynets:build"`, `model.loss = "mynets:loss"`), so the
worker, the pre-flight checks and the faces never branch on the kind.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Criterion = Callable[[Any, Any], torch.Tensor]


BY_VALUE = "ampray_by_value"
"""The module name a job records for a function handed to ampray.fit by value (never importable)."""


class ImportPathError(ValueError):
    """An import path that names nothing importable (the message names the field and the fix)."""


def split_import_path(path: str, field: str) -> tuple[str, str]:
    """"package.module:attribute" -> (module, attribute); raises ImportPathError naming `field`."""
    module, sep, attr = str(path).partition(":")
    if not sep or not module or not attr or any(not part.isidentifier() for part in module.split(".") + attr.split(".")):
        raise ImportPathError(f"{field}={path!r} is not allowed: expected an import path \"package.module:function\" "
                              "(a module importable from the working folder or PYTHONPATH, a colon, then the name "
                              "of a function in it)")
    return module, attr


def import_object(path: str, field: str) -> Any:
    """The object `path` ("package.module:attribute", attributes may be dotted) names. The working folder is
    searched first, as `python -m` would, so that a user's `mynets.py` beside the job file is found. Raises
    ImportPathError naming `field`, what failed and how to fix it."""
    module_name, attr = split_import_path(path, field)
    if module_name == BY_VALUE:
        raise ImportPathError(f"{field}={path!r} was handed to ampray.fit by value (a function of a notebook or "
                              "script): pass it to ampray.fit again, or define it in a module and name it by its "
                              "import path")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise ImportPathError(f"{field}={path!r}: no module named {err.name!r} in the working folder "
                                  f"({cwd}) or on PYTHONPATH; run from the folder that holds it, or add its "
                                  "folder to PYTHONPATH") from None
        raise ImportPathError(f"{field}={path!r}: importing {module_name!r} failed: {err} (a module it "
                              "imports is missing: install it where the job runs)") from None
    except Exception as err:  # the user's module raised at import time
        raise ImportPathError(f"{field}={path!r}: importing {module_name!r} raised {type(err).__name__}: {err}") from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            names = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n, None)))
            raise ImportPathError(f"{field}={path!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) "
                                  f"has no {attr!r}; its callables: {names[:20]}") from None
    if not callable(obj):
        raise ImportPathError(f"{field}={path!r} names a {type(obj).__name__}, not a function or class")
    return obj


def logits_of(output: Any) -> torch.Tensor | None:
    """The class scores in a model's output: the output itself when it is a tensor, a mapping's "logits"
    (a dict, Hugging Face's ModelOutput), an object's `.logits`, or the first item of a tuple or list; None
    when there is none."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) or hasattr(output, "keys"):
        value = output.get("logits") if hasattr(output, "get") else None
        return value if isinstance(value, torch.Tensor) else None
    if isinstance(getattr(output, "logits", None), torch.Tensor):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def class_dim(logits: torch.Tensor, target: torch.Tensor) -> int | None:
    """Where the classes are in `logits` for integer `target`s: the last dimension ((N, C) with (N,), or
    (N, T, V) with (N, T)), dimension 1 (torch's (N, C, d1, ...) with (N, d1, ...)), or None when the
    shapes do not pair up."""
    if logits.dim() >= 2 and target.shape == logits.shape[:-1]:
        return logits.dim() - 1
    if logits.dim() > 2 and target.shape == logits.shape[:1] + logits.shape[2:]:
        return 1
    if logits.dim() >= 2 and [d for d in target.shape if d != 1] == [d for d in logits.shape[:-1] if d != 1]:
        return logits.dim() - 1  # the same rows up to dimensions of size 1 ((N, 1, C) with (N,)): flattened
    return None


def cross_entropy(output: Any, target: torch.Tensor) -> torch.Tensor:
    """The default loss: cross-entropy of the output's class scores (`logits_of`) against integer class
    indices (-100 is ignored, as in torch), the classes in the last dimension ((N, C) logits,
    tokens of (N, T, V)) or in dimension 1 ((N, C, H, W) with (N, H, W) targets), or against class
    probabilities shaped like the scores. Anything else is a ValueError that says what to set, rather than
    a number: torch would take a float target of the output's (N,) shape as one sample's soft labels and
    train a regression model on nonsense."""
    logits = logits_of(output)
    if logits is None or not isinstance(target, torch.Tensor):
        raise TypeError(f"the default loss (cross-entropy) takes class scores (a tensor, a dict with 'logits' or a "
                        f"tuple whose first item is one) and a target tensor; got {type(output).__name__} and "
                        f"{type(target).__name__}: set model.loss to your own loss")
    if target.is_floating_point():
        if logits.dim() < 2 or target.shape != logits.shape:
            raise ValueError(f"the default loss (cross-entropy) takes integer class indices, or class probabilities "
                             f"shaped like the output; got a {str(target.dtype).removeprefix('torch.')} target "
                             f"{tuple(target.shape)} for an output {tuple(logits.shape)}: for regression set "
                             "model.loss (e.g. \"torch.nn.functional:mse_loss\"); for classes, integer labels")
        if logits.dim() > 2:
            return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1, target.size(-1)))
        return F.cross_entropy(logits, target)
    if target.dtype == torch.bool:
        raise ValueError(f"the default loss (cross-entropy) takes integer class indices; got a bool target "
                         f"{tuple(target.shape)}: store the labels as integers (0 and 1, with two class scores), or "
                         "for one score per row set model.loss = \"torch.nn.functional:binary_cross_entropy_with_logits\" "
                         "on a float target")
    where = class_dim(logits, target)
    if where is None:
        raise ValueError(f"the default loss (cross-entropy) needs one class score per class for each target: got "
                         f"an output {tuple(logits.shape)} for a target {tuple(target.shape)} "
                         f"{str(target.dtype).removeprefix('torch.')} (expected the target's shape plus a class "
                         "dimension, last or second); set model.loss for anything else")
    if target.shape == logits.shape[:-1] and logits.dim() == 2:  # (N, C) with (N,)
        return F.cross_entropy(logits, target)
    if target.shape != logits.shape[:-1] and logits.dim() > 2 and target.shape == logits.shape[:1] + logits.shape[2:]:
        # torch's (N, C, d1, ...) with (N, d1, ...)
        return F.cross_entropy(logits, target)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1))  # classes last, flattened


@dataclass(frozen=True)
class ModelSpec:
    """What ampray needs of a model; the same for a built-in kind and a user's factory."""

    name: str
    """The kind ("mlp", "cnn", "gpt") or the factory's import path."""
    build: Callable[..., nn.Module]
    """Called with `[model.options]` as keyword arguments; returns a freshly initialised nn.Module."""
    loss: Criterion
    """criterion(output, target) -> 0-d tensor."""
    builtin: bool = False
    """A zoo entry: its data may come from ampray's own schema and the built-in corpus."""
    flops_per_sample: Callable[[nn.Module, Any], int] | None = None
    """(model, a batch's inputs) -> training flops of one sample, when known (throughput in flops and MFU).
    For a user's model: its `flops_per_sample()` method, when it has one (see `model_flops_per_sample`)."""
    synthetic: Callable[[dict[str, Any], int, int], tuple[Any, torch.Tensor]] | None = None
    """(options, rows, seed) -> (inputs, targets) of the built-in corpus shaped for the model."""
    tokens_per_sample: Callable[[Any], int] | None = None
    """Tokens in one sample of a batch's inputs (language models: throughput in tokens/s)."""
    check_data: Callable[[dict[str, Any], dict[str, Any], str], None] | None = None
    """(options, summary of a Parquet dataset in ampray's schema, where) -> None or ConfigError: the data's
    kind, shape, vocabulary and labels fit the model (checked from the footers, before Ray starts)."""

    def build_model(self, options: dict[str, Any], field: str = "model.factory") -> nn.Module:
        """The model, checked to be an nn.Module (the error names `field`)."""
        model = self.build(**options)
        if not isinstance(model, nn.Module):
            raise TypeError(f"{field}={self.name!r} returned a {type(model).__name__}, not a torch.nn.Module; "
                            "expected a function that builds and returns the model")
        return model


def _builtin(kind: str) -> ModelSpec:
    from ampray.models import build_criterion, build_model
    from ampray.models.builtin_data import check_builtin_data, synthetic_corpus

    flops = {"mlp": lambda m, x: m.flops_per_sample(), "cnn": lambda m, x: m.flops_per_sample(int(x.shape[-1])),
             "gpt": lambda m, x: m.flops_per_token(int(x.shape[1])) * int(x.shape[1])}[kind]
    return ModelSpec(kind, lambda **options: build_model(kind, **options), build_criterion(kind), True, flops,
                     synthetic=lambda options, rows, seed: synthetic_corpus(kind, options, rows, seed),
                     tokens_per_sample=(lambda x: int(x.shape[1])) if kind == "gpt" else None,
                     check_data=lambda options, info, where: check_builtin_data(kind, options, info, where))


def resolve_spec(kind: str, factory: str = "", loss: str = "", objects: dict[str, Any] | None = None) -> ModelSpec:
    """The spec of a job's model: a built-in kind, or the user's factory (and loss, default cross-entropy).
    Imports the user's code, unless `objects` holds it already ({"model.factory": fn, "model.loss": fn}:
    functions handed over by value, such as a notebook's); raises ImportPathError naming the field."""
    objects = objects or {}

    def get(field: str, path: str) -> Any:
        return objects[field] if field in objects else import_object(path, field)

    if factory:
        criterion = as_criterion(get("model.loss", loss), "model.loss") if loss else cross_entropy
        return ModelSpec(factory, get("model.factory", factory), criterion)
    from ampray.models import MODEL_KINDS

    if kind not in MODEL_KINDS:
        raise ImportPathError(f"model.kind={kind!r} is not allowed: expected one of {list(MODEL_KINDS)}, or "
                              "model.factory = \"package.module:function\" for your own model")
    spec = _builtin(kind)
    return dataclasses.replace(spec, loss=as_criterion(get("model.loss", loss), "model.loss")) if loss else spec


def as_criterion(obj: Any, field: str = "model.loss") -> Criterion:
    """A loss named by its class (`"torch.nn:CrossEntropyLoss"`, `loss=nn.MSELoss`) is built with no
    arguments, as PyTorch's loss modules are used; a function or an instance is used as it is. A class
    whose constructor needs arguments is refused naming `field` (called as criterion(output, target), a
    class would take the output and target as its constructor's arguments)."""
    if not isinstance(obj, type):
        return obj
    try:
        return obj()
    except TypeError as err:
        raise ImportPathError(f"{field} names the class {obj.__module__}.{obj.__qualname__}, which cannot be built "
                              f"without arguments ({err}); expected a loss function criterion(output, target), a "
                              "class built without arguments (as torch.nn.CrossEntropyLoss), or, in ampray.fit, "
                              "an instance (loss=MyLoss(weight=...))") from None


def model_flops_per_sample(spec: ModelSpec, model: nn.Module, x: Any) -> int | None:
    """Training flops of one sample of `x` for `model` (unwrapped from DDP or torch.compile): the spec's
    formula for a built-in model, else the model's own `flops_per_sample()` method (no argument, or the
    batch's inputs), else None; a formula that fails gives None rather than stopping the run."""
    inner = model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model
    inner = getattr(inner, "_orig_mod", inner)
    try:
        if spec.flops_per_sample is not None:
            return int(spec.flops_per_sample(inner, x))
        method = getattr(inner, "flops_per_sample", None)
        if callable(method):
            try:
                return int(method(x))
            except TypeError:
                return int(method())
    except Exception:
        return None
    return None


def import_path_of(obj: Any) -> str:
    """The "module:qualname" that names `obj` (a module-level function or class)."""
    return f"{obj.__module__}:{obj.__qualname__}"
