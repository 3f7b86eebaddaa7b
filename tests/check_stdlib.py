"""Fail if a file imports anything outside the standard library (the product ships alone)."""
import ast
import sys

for path in sys.argv[1:]:
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    outside = sorted(n for n in names if n not in sys.stdlib_module_names)
    if outside:
        sys.exit(f"{path}: imports outside the standard library: {', '.join(outside)}")
    print(f"{path}: standard library only ({len(names)} modules)")
