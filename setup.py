"""Package layout: the top-level folders are the subpackages of ``duplexd``.

``actors/`` installs as ``duplexd.actors``, ``bus/`` as ``duplexd.bus`` and so on; every
subpackage below them (a folder with an ``__init__.py``, e.g. a new engine under
``actors/engines/``) is found here, so none needs listing by hand. Everything else about
the distribution is in pyproject.toml.
"""

from setuptools import find_packages, setup

ROOTS = ("actors", "adapters", "bus", "runtime")


def packages() -> list[str]:
    out: list[str] = []
    for root in ROOTS:
        out += [f"duplexd.{root}"] + [f"duplexd.{root}.{sub}" for sub in find_packages(root)]
    return out


def link_tree(dest: str) -> None:
    """``dest/duplexd/<root>`` → ``<root>`` for each root: the import names as a folder
    tree, for tools that cannot follow the install's mapping (mypy)."""
    import os
    from pathlib import Path

    here = Path(__file__).resolve().parent
    pkg = (here / dest / "duplexd").resolve()
    pkg.mkdir(parents=True, exist_ok=True)
    for root in ROOTS:
        link = pkg / root
        if link.is_symlink() and link.resolve() == here / root:
            continue
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(here / root, pkg), target_is_directory=True)  # relative: survives a move


if __name__ == "__main__":
    setup(packages=packages(), package_dir={f"duplexd.{root}": root for root in ROOTS})
