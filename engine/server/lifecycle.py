"""Model lifecycle: which versions of which models are served, and loading or unloading them live.

Triton's model control, for one repository: at start every model is loaded under the version
policy, and a model that cannot be loaded is reported not ready (with the reason) while the
others serve. ``load`` (re)loads a model's selected versions in a worker thread and then swaps
them in at once (:meth:`ModelSet.swap`): a request sees the old versions or the new ones, never
a mix. A version that is no longer served is closed, freeing its memory, once the last request
holding it has finished (:meth:`Serving.retire`). ``unload`` does the same for every version.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import EngineError
from engine.repository import list_models, sha256_file, versions
from engine.server import logs
from engine.server.errors import invalid, not_found
from engine.server.models import ModelSet, ServedModel

READY, UNAVAILABLE, LOADING, UNLOADING = "READY", "UNAVAILABLE", "LOADING", "UNLOADING"


class VersionPolicyError(EngineError):
    """A version policy that cannot be parsed."""


@dataclass(frozen=True)
class VersionPolicy:
    """Triton's version policy: the newest ``latest`` versions, or ``specific`` ones, or all."""

    latest: int = 1
    specific: tuple[int, ...] = ()
    all: bool = False

    def select(self, available: Iterable[int]) -> list[int]:
        """The versions of ``available`` this policy serves, ascending."""
        found = sorted(available)
        if self.all:
            return found
        if self.specific:
            return [v for v in found if v in self.specific]
        return found[-self.latest :]

    def describe(self) -> str:
        """The policy as ``parse`` reads it."""
        if self.all:
            return "all"
        if self.specific:
            return "specific:" + ",".join(map(str, self.specific))
        return f"latest:{self.latest}"

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        """``latest:N``, ``specific:1,3`` or ``all`` (the ``engine serve --version-policy``)."""
        kind, _, arg = text.strip().partition(":")
        try:
            if kind == "all" and not arg:
                return cls(all=True)
            if kind == "latest":
                n = int(arg or 1)
                if n >= 1:
                    return cls(latest=n)
            if kind == "specific":
                chosen = tuple(sorted({int(v) for v in arg.split(",") if v.strip()}))
                if chosen and min(chosen) >= 1:
                    return cls(specific=chosen)
        except ValueError:
            pass
        raise VersionPolicyError(
            f"version policy {text!r} is not one of latest:N (N >= 1), specific:V1,V2 or all"
        )

    @classmethod
    def from_triton(cls, policy: Any) -> VersionPolicy:
        """From the JSON of Triton's ``version_policy`` (``{"latest": {"num_versions": 2}}``)."""
        if not isinstance(policy, dict) or len(policy) != 1:
            raise invalid("version_policy must hold one of latest, specific or all")
        ((kind, body),) = policy.items()
        body = body if isinstance(body, dict) else {}
        try:
            if kind == "all":
                return cls(all=True)
            if kind == "latest":
                return cls.parse(f"latest:{int(body.get('num_versions', 1))}")
            if kind == "specific":
                chosen = ",".join(str(int(v)) for v in body.get("versions", []))
                return cls.parse(f"specific:{chosen}")
        except (VersionPolicyError, TypeError, ValueError) as exc:
            raise invalid(f"version_policy: {exc}") from None
        raise invalid(f"version_policy {kind!r} is not one of latest, specific or all")


Opener = Callable[[Path, str, int], ServedModel]  # (repo, name, version) -> a loaded version


class ModelManager:
    """Loads and unloads the models of one repository into a :class:`ModelSet`."""

    def __init__(self, repo: Path, opener: Opener, policy: VersionPolicy | None = None):
        self.repo = Path(repo)
        self.opener = opener
        self.policy = policy or VersionPolicy()
        self.models = ModelSet()
        self.serving: Any = None  # set by the server: queues, statistics and retiring
        self.on_change: Callable[[str, bool], Any] | None = None  # (name, ready), e.g. health
        self.policies: dict[str, VersionPolicy] = {}  # per-model policies given at load
        self.states: dict[str, str] = {}  # LOADING / UNLOADING while under way, else absent
        self._digests: dict[int, str] = {}  # id(version) -> its manifest's sha256
        self._locks: dict[str, asyncio.Lock] = {}

    # -- start-up --------------------------------------------------------------------------------
    async def load_all(self, names: list[str] | None = None) -> None:
        """Load every model of the repository (or ``names``); failures only mark them not ready."""
        available = list_models(self.repo)
        if not available:
            raise EngineError(
                f"model repository {self.repo} holds no models; export one with "
                "`engine export CHECKPOINT --repo DIR`"
            )
        wanted = names or list(available)
        missing = [n for n in wanted if n not in available]
        if missing:
            raise EngineError(
                f"no model {missing[0]!r} in {self.repo}; models there: {', '.join(available)}"
            )
        for name in wanted:
            with contextlib.suppress(Exception):  # logged, and recorded as not ready, by load()
                await self.load(name)
        if not self.models.names():
            reasons = "; ".join(self.models.unavailable.values())
            raise EngineError(f"no model of {self.repo} could be loaded: {reasons}")

    # -- control ---------------------------------------------------------------------------------
    async def load(self, name: str, policy: VersionPolicy | None = None) -> list[int]:
        """(Re)load ``name``'s versions under ``policy``; return the versions now served.

        A version already loaded whose manifest has not changed is kept as it is. If any selected
        version fails to load, nothing changes for a model that was serving (its old versions
        stay); a model that was not serving is marked not ready with the reason.
        """
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            if policy is not None:
                self.policies[name] = policy
            policy = self.policies.get(name, self.policy)
            self.states[name] = LOADING
            try:
                return await self._load(name, policy)
            except Exception as exc:
                reason = str(exc)
                if not self.models.versions(name):
                    self.models.unavailable[name] = reason
                    await self._notify(name, False)
                logs.log("model not loaded", logging.ERROR, model=name, reason=reason)
                raise
            finally:
                self.states.pop(name, None)

    async def _load(self, name: str, policy: VersionPolicy) -> list[int]:
        found = versions(self.repo, name)
        if not found:
            raise not_found(f"model {name!r} has no versions in repository {self.repo}")
        chosen = policy.select(found)
        if not chosen:
            raise not_found(
                f"model {name!r}: version policy {policy.describe()} selects none of its "
                f"versions {', '.join(map(str, found))}"
            )
        current = self.models.versions(name)
        keep, opened = {}, {}
        try:
            for version in chosen:
                digest = self._digest(name, version)
                old = current.get(version)
                if old is not None and self._digests.get(id(old)) == digest:
                    keep[version] = old
                    continue
                model = await asyncio.to_thread(self.opener, self.repo, name, version)
                self._digests[id(model)] = digest
                opened[version] = model
        except BaseException:
            for model in opened.values():
                await model.close()
            raise
        for model in opened.values():
            if self.serving is not None:
                self.serving.serve(model)
        replaced = self.models.swap(name, {**keep, **opened})
        await self._retire(m for v, m in replaced.items() if keep.get(v) is not m)
        await self._notify(name, True)
        logs.log(
            "model loaded",
            model=name,
            versions=sorted(chosen),
            policy=policy.describe(),
            reloaded=sorted(opened),
        )
        return sorted(chosen)

    async def unload(self, name: str) -> None:
        """Stop serving ``name``; in-flight requests finish, then its versions are closed."""
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            if not self.models.versions(name) and name not in self.models.unavailable:
                raise not_found(f"model {name!r} is not loaded; loaded: {self._loaded()}")
            self.states[name] = UNLOADING
            try:
                replaced = self.models.swap(name, {})
                self.models.unavailable[name] = "unloaded"
                await self._notify(name, False)
                await self._retire(iter(replaced.values()))
            finally:
                self.states.pop(name, None)
            logs.log("model unloaded", model=name)

    async def _retire(self, old: Iterable[ServedModel]) -> None:
        for model in list(old):
            self._digests.pop(id(model), None)
            if self.serving is not None:
                # in the background: the caller's switch is done; memory goes when calls end
                asyncio.get_running_loop().create_task(self.serving.retire(model))
            else:
                await model.close()

    async def _notify(self, name: str, ready: bool) -> None:
        if self.on_change is not None:
            result = self.on_change(name, ready)
            if asyncio.iscoroutine(result):
                await result

    def policy_of(self, name: str) -> VersionPolicy:
        """The version policy ``name`` is served under."""
        return self.policies.get(name, self.policy)

    def _digest(self, name: str, version: int) -> str:
        """The manifest's sha256 (it changes with any file); "" if missing (the load says why)."""
        try:
            return sha256_file(self.repo / name / str(version) / "manifest.json")
        except OSError:
            return ""

    def _loaded(self) -> str:
        return ", ".join(self.models.names()) or "(none)"

    # -- index -----------------------------------------------------------------------------------
    def index(self, ready_only: bool = False) -> list[tuple[str, str, str, str]]:
        """(name, version, state, reason) of every model version in the repository."""
        rows = []
        try:
            available = list_models(self.repo)
        except EngineError:
            available = {}
        for name in sorted(set(available) | set(self.models.names())):
            served = self.models.versions(name)
            state = self.states.get(name)
            for version in sorted(set(available.get(name, [])) | set(served)):
                if version in served:
                    row = (name, str(version), state or READY, "")
                elif name in self.models.unavailable and not served:
                    row = (name, str(version), state or UNAVAILABLE, self.models.unavailable[name])
                else:
                    policy = self.policies.get(name, self.policy).describe()
                    row = (name, str(version), state or UNAVAILABLE, f"not in policy {policy}")
                if not ready_only or row[2] == READY:
                    rows.append(row)
        return rows


def load_config(parameters: Any) -> VersionPolicy | None:
    """The version policy in a RepositoryModelLoad's ``config`` parameter (Triton's JSON)."""
    param = parameters.get("config") if parameters is not None else None
    if param is None:
        return None
    kind = param.WhichOneof("parameter_choice")
    if kind != "string_param":
        raise invalid("parameter 'config' must be a JSON string (Triton's model configuration)")
    try:
        config = json.loads(param.string_param)
    except json.JSONDecodeError as exc:
        raise invalid(f"parameter 'config' is not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise invalid("parameter 'config' must be a JSON object")
    unknown = set(config) - {"version_policy", "name"}
    if unknown:
        raise invalid(
            f"this server takes only version_policy in a load's config; got {sorted(unknown)}"
        )
    return (
        VersionPolicy.from_triton(config["version_policy"]) if "version_policy" in config else None
    )
