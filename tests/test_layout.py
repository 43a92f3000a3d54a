"""The package's architecture, as its folders show it: helper/ holds only the groups, a module imports only from its
own group and the groups below it, and the entry scripts are thin (they parse and call into helper/jobs)."""
import ast
import os

from tests import ROOT, read_text

LAYERS = ("run", "data", "train", "report", "attacks", "defenses", "jobs")  # lowest first, as helper/__init__.py
ENTRY_SCRIPTS = ("distri.py", "distri_dsextend.py", "adba.py", "scan.py", "bench.py", "reproduce.py")


def helper_imports(path):
    """The ``helper.GROUP`` modules a file imports (at any depth: lazy imports inside functions count too)."""
    found = set()
    for node in ast.walk(ast.parse(read_text(path))):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
        for name in names:
            parts = name.split(".")
            if parts[0] == "helper":
                if len(parts) == 1:  # from helper import GROUP
                    found.update(a.name for a in node.names)
                else:
                    found.add(parts[1])
    return found


def modules():
    for group in sorted(os.listdir(os.path.join(ROOT, "helper"))):
        folder = os.path.join(ROOT, "helper", group)
        if os.path.isdir(folder) and group != "__pycache__":
            for name in sorted(os.listdir(folder)):
                if name.endswith(".py"):
                    yield group, os.path.join(folder, name)


def test_helper_holds_only_the_groups_and_its_docstring_names_each():
    entries = {e for e in os.listdir(os.path.join(ROOT, "helper")) if e != "__pycache__"}
    assert entries == {"__init__.py", *LAYERS}
    doc = ast.get_docstring(ast.parse(read_text(os.path.join(ROOT, "helper", "__init__.py"))))
    assert [line.split()[0] for line in doc.splitlines() if line.startswith("    ")] == list(LAYERS)
    for group in LAYERS:
        assert ast.get_docstring(ast.parse(read_text(os.path.join(ROOT, "helper", group, "__init__.py"))))


def test_no_module_imports_from_a_group_above_its_own():
    above = {(os.path.relpath(path, ROOT), imported) for group, path in modules()
             for imported in helper_imports(path) if LAYERS.index(imported) > LAYERS.index(group)}
    assert above == set()


def test_the_layer_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from helper.jobs.distill import run\n    from helper import report\n")
    assert helper_imports(bad) == {"jobs", "report"}


def test_entry_scripts_are_thin():
    for script in ENTRY_SCRIPTS:
        lines = read_text(os.path.join(ROOT, script)).splitlines()
        assert len(lines) <= 60, f"{script}: {len(lines)} lines"
        tree = ast.parse("\n".join(lines))
        defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        assert len(defs) <= 2, f"{script}: {[d.name for d in defs]}"


# The modules that know no defense by name: the run, data and training layers, the distillation job and the parts of
# report/ that read any run. (The jobs that choose defenses, auto, demo, the grid's presets, bench and gpucheck, name
# them by design; table.py and figures.py read every run against the plain-KD cell, "kd", and table.py holds the
# paper's published numbers.)
GENERIC = [os.path.join("helper", g, f) for g in ("run", "data", "train") for f in
           sorted(os.listdir(os.path.join(ROOT, "helper", g))) if f.endswith(".py")] + [
    os.path.join("helper", "jobs", f) for f in ("distill.py", "retune.py", "scan.py")] + [
    os.path.join("helper", "report", f) for f in ("aggregate.py", "plot.py", "attention.py", "precision.py")]


def defense_names_in(path, names):
    """The string constants of a file that are a defense's name or say ``--defense NAME``, with their lines."""
    import re
    found = []
    for node in ast.walk(ast.parse(read_text(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            said = {node.value} & names | set(re.findall(r"--defense (\w+)", node.value)) & names
            found += [(name, node.lineno) for name in said]
    return found


def test_no_generic_module_names_a_defense():
    from helper.defenses import DEFENSES
    named = {path: defense_names_in(os.path.join(ROOT, path), set(DEFENSES)) for path in GENERIC}
    not_a_defense = {os.path.join("helper", "train", "engine.py"): {"kd"}}  # "kd": the printed short form of kd_loss
    assert {p: n for p, n in named.items() if {name for name, _ in n} - not_a_defense.get(p, set())} == {}


def test_the_name_check_sees_a_defense_named_in_a_string(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('x = "asd"\ny = f"run --defense ibau now"\nz = "kd_loss"\n')
    assert sorted(defense_names_in(bad, {"asd", "ibau", "kd"})) == [("asd", 1), ("ibau", 2)]
