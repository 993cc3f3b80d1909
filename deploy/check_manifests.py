"""Check KServe manifests field by field against the kserve SDK's models.

    python deploy/check_manifests.py deploy/kserve/*.yaml

Each document's ``kind`` picks the SDK model (ServingRuntime, InferenceService); every key must
be a field of that model, recursively, with a value of the field's type. The SDK's own
deserializer would silently drop a misspelled key; this fails on it. Prints one line per file
and exits 1 on the first problem. Needs ``pip install -e '.[deploy]'`` (kserve, pyyaml).
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import yaml

KINDS = {
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "V1alpha1ClusterServingRuntime",
    ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
}
PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}


def _model_class(name: str):
    for module in ("kserve.models", "kubernetes.client.models"):
        cls = getattr(importlib.import_module(module), name, None)
        if cls is not None:
            return cls
    raise AssertionError(f"no SDK model {name}")


def check(value, type_name: str, path: str) -> None:
    """Fail unless ``value`` fits the SDK type ``type_name`` in every key, recursively."""
    if type_name in PRIMITIVES:
        assert isinstance(value, PRIMITIVES[type_name]), f"{path}: {value!r} is not {type_name}"
        return
    if match := re.fullmatch(r"(?:list|List)\[(.+)\]", type_name):
        assert isinstance(value, list), f"{path}: not a list"
        for i, item in enumerate(value):
            check(item, match.group(1), f"{path}[{i}]")
        return
    if match := re.fullmatch(r"(?:dict\(str, (.+)\)|Dict\[str, (.+)\])", type_name):
        assert isinstance(value, dict), f"{path}: not a mapping"
        for key, item in value.items():
            check(item, match.group(1) or match.group(2), f"{path}.{key}")
        return
    if type_name.endswith("Quantity"):  # resource.Quantity: a string or number on the wire
        assert isinstance(value, (str, int, float)), f"{path}: {value!r} is not a quantity"
        return
    cls = _model_class(type_name)
    if not cls.openapi_types:  # int-or-string and the like: a scalar on the wire
        assert isinstance(value, (str, int, float)), f"{path}: {value!r} is not a scalar"
        return
    assert isinstance(value, dict), f"{path}: {type_name} must be a mapping"
    by_json = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    for key, item in value.items():
        assert key in by_json, f"{path}: {type_name} has no field {key!r}"
        check(item, cls.openapi_types[by_json[key]], f"{path}.{key}")


def check_file(path: Path) -> str:
    """Check every document of ``path``; return the SDK models they matched."""
    found = []
    for doc in yaml.safe_load_all(Path(path).read_text()):
        key = (doc.get("apiVersion"), doc.get("kind"))
        if key not in KINDS:
            raise AssertionError(f"{path}: unknown apiVersion/kind {key}")
        check(doc, KINDS[key], doc["kind"])
        found.append(KINDS[key])
    return ", ".join(found)


def main(argv: list[str]) -> int:
    """Check each file named in ``argv``; 0 if all match."""
    for name in argv:
        try:
            print(f"{name}: ok ({check_file(Path(name))})")
        except AssertionError as exc:
            print(f"{name}: {exc}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
