"""The shape of the code, checked from its source (ast; nothing is imported
but errors.py and the two kind tables):

- imports go one way, imports inside functions included:
  cli -> periodic -> api -> agent server -> engine -> resources ->
  {image, remote, procfs, agent client, migration protocol} -> sys;
  errors, faults, pipeline (and the package itself) from anywhere;
- no import cycle among linuxcr modules;
- no private name (``_name``) of one module used by another, beyond the
  commented ALLOWED list;
- one exit-code table (errors.EXIT_CODES) that README and ``lcr --help`` show,
  naming every error class;
- the fd-kind registry and the image's kind table list the same kinds.
"""
from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from collections import defaultdict
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PKG = REPO / "linuxcr"

# --------------------------------------------------------------------------
# the modules and their imports

@lru_cache(maxsize=None)
def modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        name = ".".join(p.relative_to(REPO).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


@lru_cache(maxsize=None)
def tree(mod: str) -> ast.Module:
    return ast.parse(modules()[mod].read_text(), str(modules()[mod]))


def _resolve(name: str) -> str | None:
    """The linuxcr module ``name`` is, or is in (from pkg import name)."""
    mods = modules()
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _base(mod: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = mod.split(".")
    if not modules()[mod].name == "__init__.py":
        parts = parts[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def imports(mod: str) -> dict[str, int]:
    """linuxcr modules ``mod`` imports, anywhere in it -> first line."""
    out: dict[str, int] = {}
    for node in ast.walk(tree(mod)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _base(mod, node)
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            if n == "linuxcr" or n.startswith("linuxcr."):
                r = _resolve(n)
                # a package's own submodule from its __init__, or a module
                # importing its own package: not an arrow between layers
                if r and r != mod and not mod.startswith(r + "."):
                    out.setdefault(r, node.lineno)
    return out


@lru_cache(maxsize=None)
def graph() -> dict[str, dict[str, int]]:
    return {m: imports(m) for m in modules()}


# --------------------------------------------------------------------------
# the layers

ANYWHERE = None
# rank of each layer: a module may import its own layer (no cycle, see
# below) and any layer under it, never one above.
RANKS = {
    "cli": 7,            # cli.py, cli_migrate.py, cli_common.py, cli_output.py, __main__.py, handoff.py
    "periodic": 6,       # above the API, calling it: periodic.py (--interval), job.py
                         # (lcr run --checkpoint-dir), selfckpt.py (checkpoint_self)
    "api": 5,            # api.py, results.py
    "agent server": 4,   # agent/server.py: drives the engine; agent/worker.py, its forks
    "engine": 3,         # engine/*, migration/skeleton.py
    "resources": 2,
    "low": 1,            # image, remote, procfs, agent client, migration/protocol.py
    "sys": 0,
}
# Inside the low layer: what one part must not use of another.
LOW_FORBIDDEN = {("image", "remote"), ("procfs", "remote"), ("image", "agent client"),
                 ("procfs", "agent client"), ("remote", "agent client")}


def layer(mod: str) -> tuple[str | None, str]:
    """(layer, part): the layer name (None: usable from anywhere) and, in
    the low layer, which part."""
    parts = mod.split(".")
    top = parts[1] if len(parts) > 1 else ""
    if mod == "linuxcr" or top in ("errors", "faults", "pipeline"):
        return ANYWHERE, top
    if top in ("cli", "cli_migrate", "cli_common", "cli_output", "cli_man", "__main__", "handoff"):
        return "cli", top
    if top in ("periodic", "job", "selfckpt"):
        return "periodic", top
    if top == "api":
        return top, top
    if top == "results":          # the API's result types (and their JSON schemas)
        return "api", top
    if top == "agent":         # worker.py: forked by the server, runs commands for it
        return ("agent server", "agent server") \
            if mod in ("linuxcr.agent.server", "linuxcr.agent.worker") else ("low", "agent client")
    if top == "migration":
        return ("engine", "engine") if mod == "linuxcr.migration.skeleton" else ("low", "migration")
    if top in ("engine", "resources", "sys"):
        return top, top
    if top in ("image", "remote", "procfs"):
        return "low", top
    raise AssertionError(f"{mod}: no layer known for it: add it to tests/test_layers.py")


def test_every_module_has_a_layer():
    for m in modules():
        layer(m)


def bad_arrows() -> list[str]:
    out = []
    for a, targets in graph().items():
        la, pa = layer(a)
        for b, line in targets.items():
            lb, pb = layer(b)
            why = None
            if lb is ANYWHERE:
                continue
            if la is ANYWHERE:
                why = f"{a} is used from anywhere, so it may use only errors/faults/pipeline"
            elif RANKS[lb] > RANKS[la]:
                why = f"{la} must not import {lb} (above it)"
            elif la == lb == "low" and (pa, pb) in LOW_FORBIDDEN:
                why = f"{pa} must not import {pb}"
            if why:
                out.append(f"{modules()[a].relative_to(REPO)}:{line}: {a} -> {b}: {why}")
    return sorted(out)


def test_imports_go_one_way():
    bad = bad_arrows()
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    g = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 10000))
    try:
        for v in g:
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(old)
    return out


def test_no_import_cycles():
    found = cycles()
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_checks_can_fail(tmp_path):
    """The graph code sees imports inside functions and relative ones."""
    src = ("def f():\n    from linuxcr import api\n    from ..image import runs\n"
           "    import linuxcr.cli\n")
    node = ast.parse(src)
    real = tree
    try:
        globals()["tree"] = lambda m: node if m == "linuxcr.resources.pstree" else real(m)
        got = imports("linuxcr.resources.pstree")
    finally:
        globals()["tree"] = real
    assert {"linuxcr.api", "linuxcr.image.runs", "linuxcr.cli"} <= set(got)
    assert layer("linuxcr.api")[0] == "api" and RANKS["api"] > RANKS["resources"]


# --------------------------------------------------------------------------
# private means private

def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


# (using module, used name): private names still used across modules, each
# with why.  Remove an entry when its use goes; never add one without a reason.
# (module, private name) pairs allowed across modules, each with a comment
# saying why; today none: every name used across modules is public.
ALLOWED: set[tuple[str, str]] = set()


@lru_cache(maxsize=None)
def private_definitions() -> dict[str, set[str]]:
    """Private name -> modules that define it (def, class, assignment, self.x = ...)."""
    out: dict[str, set[str]] = defaultdict(set)
    for m in modules():
        for n in ast.walk(tree(m)):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = n.name
            elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                name = n.id
            elif isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store):
                name = n.attr
            elif isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name):
                name = n.target.id
            else:
                continue
            if _private(name):
                out[name].add(m)
    return out


def private_uses(mod: str) -> list[tuple[str, int]]:
    """("module.name" or ".attr", line) for each private name of another
    module that ``mod`` uses: imported by name, read from an imported
    module, or an attribute of an object that only other modules define."""
    mods = modules()
    bound: dict[str, str] = {}       # local name -> linuxcr module
    out: list[tuple[str, int]] = []
    pkg = mod if mods[mod].name == "__init__.py" else mod.rpartition(".")[0]
    for n in ast.walk(tree(mod)):
        if isinstance(n, ast.Import):
            for a in n.names:
                if a.name.startswith("linuxcr"):
                    bound[a.asname or "linuxcr"] = a.name if a.asname else "linuxcr"
        elif isinstance(n, ast.ImportFrom):
            base = _base(mod, n)
            if not base.startswith("linuxcr"):
                continue
            for a in n.names:
                full = f"{base}.{a.name}"
                if full in mods:
                    bound[a.asname or a.name] = full
                # a private module of a package is for that package's modules
                private_module = next((p for p in base.split(".") if _private(p)), None)
                if private_module and not base.startswith(pkg + "."):
                    out.append((full, n.lineno))
                if _private(a.name) and full not in mods:
                    out.append((full, n.lineno))
    defs = private_definitions()
    for n in ast.walk(tree(mod)):
        if not (isinstance(n, ast.Attribute) and _private(n.attr)):
            continue
        if isinstance(n.value, ast.Name) and n.value.id in bound:
            out.append((f"{bound[n.value.id]}.{n.attr}", n.lineno))
        elif n.attr in defs and mod not in defs[n.attr] and \
                not (isinstance(n.value, ast.Name) and n.value.id in ("self", "cls")):
            out.append((f".{n.attr}", n.lineno))
    return out


def test_private_names_stay_private():
    bad, used = [], set()
    for m in modules():
        for what, line in private_uses(m):
            if (m, what) in ALLOWED:
                used.add((m, what))
                continue
            bad.append(f"{modules()[m].relative_to(REPO)}:{line}: {m} uses {what}")
    assert not bad, ("private names used across modules (make them public, or add a "
                     "commented entry to ALLOWED):\n" + "\n".join(sorted(set(bad))))
    stale = ALLOWED - used
    assert not stale, f"ALLOWED entries no longer needed: remove them: {sorted(stale)}"


def test_private_check_sees_uses():
    src = "from linuxcr import api\nfrom linuxcr.cli_common import _x\napi._key(1)\n"
    node = ast.parse(src)
    real = tree
    try:
        globals()["tree"] = lambda m: node if m == "linuxcr.periodic" else real(m)
        got = {w for w, _ in private_uses("linuxcr.periodic")}
    finally:
        globals()["tree"] = real
    assert {"linuxcr.api._key", "linuxcr.cli_common._x"} <= got


# --------------------------------------------------------------------------
# errors and exit codes

def _errors_module():
    """errors.py on its own (as tests/helpers.py loads it)."""
    spec = importlib.util.spec_from_file_location("_lcr_errors_layers", PKG / "errors.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_error_class_is_in_errors_py():
    """No LcrError subclass is defined outside errors.py (ast: every class
    whose bases name an error class)."""
    errors = _errors_module()
    names = {n for n in dir(errors) if isinstance(getattr(errors, n), type)
             and issubclass(getattr(errors, n), BaseException)}
    classes = [(m, n.name, {ast.unparse(b).rpartition(".")[2] for b in n.bases})
               for m in modules() if m != "linuxcr.errors"
               for n in ast.walk(tree(m)) if isinstance(n, ast.ClassDef)]
    bad: list[str] = []
    while True:         # to a fixpoint: classes derived from those found too
        more = [(m, c) for m, c, bases in classes if bases & names and f"{m}.{c}" not in bad]
        if not more:
            break
        bad += [f"{m}.{c}" for m, c in more]
        names |= {c for _, c in more}
    assert not bad, f"error classes outside errors.py: {bad}"


def test_exit_code_table():
    errors = _errors_module()
    classes = {n: getattr(errors, n) for n in dir(errors) if isinstance(getattr(errors, n), type)
               and issubclass(getattr(errors, n), errors.LcrError)}
    rows = {name: code for code, name, _ in errors.EXIT_CODES if name != "-"}
    assert len(rows) == len([r for r in errors.EXIT_CODES if r[1] != "-"]), "a class twice"
    assert set(rows) == set(classes), "EXIT_CODES must list every error class, no other"
    for name, code in rows.items():
        assert classes[name].exit_code == code, f"{name}: exit_code {classes[name].exit_code}, table {code}"
    # distinct codes, except a class that shares its base class's code
    by_code: dict[int, list[type]] = defaultdict(list)
    for name, cls in classes.items():
        by_code[cls.exit_code].append(cls)
    for code, group in by_code.items():
        roots = [c for c in group if not any(c is not o and issubclass(c, o) for o in group)]
        assert len(roots) == 1, f"exit code {code} is shared by unrelated classes {group}"
    others = [code for code, name, _ in errors.EXIT_CODES if name == "-"]
    assert len(set(others)) == len(others) and not set(others) & set(by_code)
    assert errors.SUCCESS == 0 and errors.INTERNAL_ERROR in others


def _readme_table() -> list[tuple[int, str, str]]:
    text = (REPO / "README.md").read_text()
    start = text.index("| exit | error | meaning |")
    rows = []
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        code, name, meaning = (c.strip() for c in line.strip("|").split("|"))
        rows.append((int(code), name.strip("`"), meaning))
    return rows


def test_readme_exit_codes_match_the_table():
    errors = _errors_module()
    assert _readme_table() == list(errors.EXIT_CODES)


def test_help_shows_the_table():
    r = subprocess.run([sys.executable, "-m", "linuxcr", "--help"], capture_output=True,
                       text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    lines = [re.sub(r"\s+", " ", ln.strip()) for ln in r.stdout.splitlines()]
    for code, name, meaning in _errors_module().EXIT_CODES:
        assert f"{code} {name} {meaning}" in lines, (code, name)


# --------------------------------------------------------------------------
# fd kinds

def test_fd_kinds_registry_matches_the_image_kind_table():
    from linuxcr.image.kinds import KIND_STATES
    from linuxcr.resources.fdkinds import BY_NAME, REGISTRY
    registry = [k.name for k in REGISTRY]
    states = [s.__struct_config__.tag for s in KIND_STATES]
    assert len(set(registry)) == len(registry) == len(BY_NAME), f"a kind twice: {registry}"
    assert len(set(states)) == len(states), f"a state twice: {states}"
    assert sorted(registry) == sorted(states), (
        f"only in resources/fdkinds: {sorted(set(registry) - set(states))}; "
        f"only in image/kinds.py: {sorted(set(states) - set(registry))}")
