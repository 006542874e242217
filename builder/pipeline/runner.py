"""The runner of declared stages (osbuild's ``Pipeline.build_stages`` is the model).

A stage declares its name, the earlier stages whose outputs it reads (``after``), and,
if its output is worth keeping, the inputs it depends on: its cache key is the hash of
those and of the keys of the stages it reads, so a change anywhere upstream changes every
key downstream. The runner finds the newest stage whose output is already stored, runs
the rest in order, and owns everything around them: locks, storing, the progress lines,
the facts passed between stages (installed packages, audit findings) and ``-v``'s "why
did this miss". Whether a tree is layered or copied is the business of
:mod:`builder.pipeline.trees`, not of the stages."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.errors import BuildFailed
from builder.pipeline.cache import BASE, StageCache, base_of, digest, place
from builder.pipeline.progress import Progress
from builder.pipeline.trees import Output, Trees
from builder.plan import Plan

log = logging.getLogger("amiforge.cache")
FACTS = "facts.json"


def _always(plan: Plan) -> bool:
    return True


def _no_detail(plan: Plan, extras: dict[str, Any]) -> str:
    return ""


@dataclass(frozen=True)
class Stage:
    """One step of the build. ``run`` writes the stage's output at ``ctx.output`` (a
    folder, or for a ``tree`` stage the tree itself) and may return facts for later
    stages. ``inputs`` None: the output is not kept between builds."""

    name: str
    run: Callable[[Context], dict[str, Any] | None]
    after: tuple[str, ...] = ()
    inputs: Callable[[Plan, dict[str, Any]], dict[str, Any]] | None = None
    tree: bool = False
    when: Callable[[Plan], bool] = _always
    detail: Callable[[Plan, dict[str, Any]], str] = _no_detail
    check: Callable[[Plan, dict[str, Any]], None] | None = None  # on the stage's facts


@dataclass
class Context:
    """What a running stage sees."""

    plan: Plan
    workspace: Path
    output: Path
    extras: dict[str, Any]
    inputs: dict[str, Any]
    cache: StageCache | None
    runner: Runner
    source: str = "built"

    def input(self, name: str) -> Path:
        """The output of an earlier stage: its folder, or a readable view of its tree."""
        return self.runner.view(name)


@dataclass
class Result:
    facts: dict[str, Any] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)


class Runner:
    def __init__(self, cache: StageCache | None, workspace: Path, progress: Progress,
                 held: contextlib.ExitStack):
        self.cache, self.workspace, self.progress, self.held = cache, workspace, progress, held
        self.trees = Trees(workspace, held)
        self.outputs: dict[str, Output] = {}

    # --- keys --------------------------------------------------------------------------

    @staticmethod
    def stage_inputs(stages: Sequence[Stage], plan: Plan, extras: dict[str, Any]
                     ) -> dict[str, dict[str, Any]]:
        """Each kept stage's inputs, with the keys of the stages it reads (chained)."""
        out: dict[str, dict[str, Any]] = {}
        for stage in stages:
            if stage.inputs is None:
                continue
            after = {name: digest(out[name]) for name in stage.after if name in out}
            own = stage.inputs(plan, extras)
            out[stage.name] = json.loads(json.dumps({**own, "after": after},
                                                    default=str))
        return out

    # --- running -----------------------------------------------------------------------

    def run(self, stages: Sequence[Stage], plan: Plan, extras: dict[str, Any]) -> Result:
        active = [s for s in stages if s.when(plan)]
        inputs = self.stage_inputs(active, plan, extras)
        result = Result(keys={name: digest(i) for name, i in inputs.items()})
        start = self._newest_stored(active, result.keys)
        if start >= 0:  # its facts include those of the stages before it
            result.facts.update(self._reuse(active[start], result.keys[active[start].name]))
        for index, stage in enumerate(active):
            with self.progress.stage(stage.name, stage.detail(plan, extras)) as line:
                if index < start:
                    line.source = "not needed"
                elif index == start:
                    line.source = "cache"
                else:
                    line.source = self._make(stage, plan, inputs, result, extras)
                if stage.check is not None:  # inside: a failure shows on this stage's line
                    stage.check(plan, result.facts)
        return result

    def _newest_stored(self, stages: Sequence[Stage], keys: dict[str, str]) -> int:
        """The index of the newest kept stage whose stored output can be used, or -1."""
        if self.cache is None:
            return -1
        for index in range(len(stages) - 1, -1, -1):
            stage = stages[index]
            if stage.inputs is not None and self._usable(stage.name, keys[stage.name]):
                return index
        return -1

    def _usable(self, name: str, key: str) -> bool:
        assert self.cache is not None
        self.held.enter_context(self.cache.in_use(name, key))
        entry = self.cache.lookup(name, key)
        if entry is None:
            return False
        base = base_of(entry.path)
        if base is None:
            return True
        stage, base_key, base_id = base
        return (self.trees.layers_usable(self.cache.root) and self._usable(stage, base_key)
                and self.cache.entry_id(stage, base_key) == base_id)

    def _stale(self, name: str, key: str) -> bool:
        """A layered entry whose base entry is gone or was made again: no build can use it
        (a build using it would hold its base), so it may be replaced."""
        assert self.cache is not None
        return self.cache.orphaned(name, key)

    def _reuse(self, stage: Stage, key: str) -> dict[str, Any]:
        assert self.cache is not None
        self.outputs[stage.name] = self._stored_output(stage, key)
        facts = self.cache.path(stage.name, key) / FACTS
        return json.loads(facts.read_text()) if facts.is_file() else {}

    def _stored_output(self, stage: Stage, key: str) -> Output:
        assert self.cache is not None
        path = self.cache.path(stage.name, key)
        return self._stored_tree(path) if stage.tree else Output(path)

    def _stored_tree(self, entry: Path) -> Output:
        """A stored tree: whole, or an upper layer over the tree of its base entry."""
        assert self.cache is not None
        base = base_of(entry)
        if base is None:
            return Output(entry / "tree", tree=True)
        lower = self._stored_tree(self.cache.path(base[0], base[1]))
        return Output(entry / "upper", lower=lower, tree=True)

    def _make(self, stage: Stage, plan: Plan, inputs: dict[str, dict[str, Any]],
              result: Result, extras: dict[str, Any]) -> str:
        key = result.keys.get(stage.name)
        with contextlib.ExitStack() as making:
            if key is not None and self.cache is not None:
                making.enter_context(self.cache.making(stage.name, key))
                if self._usable(stage.name, key):  # another build made it meanwhile
                    result.facts.update(self._reuse(stage, key))
                    return "cache"
                if self._stale(stage.name, key):
                    self.cache.discard(stage.name, key)
                if log.isEnabledFor(logging.INFO):
                    log.info("    %s not cached: %s", stage.name,
                             self.cache.why_missed(stage.name, inputs[stage.name]))
            output, upper = self._prepare(stage)
            ctx = Context(plan, self.workspace, output, extras,
                          inputs.get(stage.name, {}), self.cache, self)
            result.facts.update(stage.run(ctx) or {})
            self.outputs[stage.name] = Output(upper or output, tree=stage.tree,
                                              lower=self._lower(stage) if upper else None)
            if key is not None and self.cache is not None:
                self._store(stage, key, inputs[stage.name], result.facts)
            return ctx.source

    def _lower(self, stage: Stage) -> Output | None:
        trees = [self.outputs[n] for n in stage.after if n in self.outputs
                 and self.outputs[n].tree]
        return trees[0] if trees else None

    def _prepare(self, stage: Stage) -> tuple[Path, Path | None]:
        """Where the stage writes: a folder, a new tree, or a tree over the tree it reads
        (layered, or a copy). Returns it and the upper folder of a layered tree."""
        if not stage.tree:
            folder = self.workspace / stage.name
            folder.mkdir()
            return folder, None
        base = self._lower(stage)
        target = self.workspace / f"{stage.name}-tree"
        if base is None:
            return target, None
        if base.path.is_relative_to(self.workspace) and base.lower is None:
            return base.path, None  # nothing keeps the tree it reads: change it in place
        return target, self.trees.writable(target, base.layers())

    def _store(self, stage: Stage, key: str, inputs: dict[str, Any],
               facts: dict[str, Any]) -> None:
        assert self.cache is not None
        if self.cache.lookup(stage.name, key) is not None:
            return  # stored, but not usable here (layers where overlays cannot be used): keep ours
        output = self.outputs[stage.name]
        with self.cache.new_entry(stage.name, key, inputs) as entry:
            if stage.tree:
                self.trees.release()
                place(output.path, entry / ("upper" if output.lower else "tree"), "move")
                if output.lower is not None:
                    stage_name, base_key = _stage_of(self.cache.root, output.lower)
                    base_id = self.cache.entry_id(stage_name, base_key)
                    (entry / BASE).write_text(json.dumps([stage_name, base_key, base_id]))
            else:
                for child in output.path.iterdir():
                    place(child, entry / child.name, "move")
            (entry / FACTS).write_text(json.dumps(facts, sort_keys=True))
        self.held.enter_context(self.cache.in_use(stage.name, key))
        self.outputs[stage.name] = self._stored_output(stage, key)

    # --- what stages read --------------------------------------------------------------

    def view(self, name: str) -> Path:
        output = self.outputs.get(name)
        if output is None:
            raise BuildFailed(f"stage {name!r} has no output in this build")
        if output.lower is None:
            return output.path
        return self.trees.readonly(self.workspace / f"{name}-view", output.layers())


def _stage_of(cache_root: Path, output: Output) -> tuple[str, str]:
    """(stage, key) of a stored tree output (the entry folder holding it)."""
    entry = output.path.parent
    if entry.parent.parent != cache_root / "stages":
        raise BuildFailed(f"{output.path} is not a stored tree")
    return entry.parent.name, entry.name
