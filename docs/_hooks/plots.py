"""mkdocs hook: the default run's plots, committed under reports/plots/, join the site as
assets/<name>.png, so the pages show the pipeline's own figures without a second copy."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

PLOTS = ("quality_vs_latency.png", "quality_vs_size.png")


def on_files(files, config):
    """Add each plot of reports/plots/ as assets/<name> (a missing one fails the page's link)."""
    root = Path(config.config_file_path).parent
    for name in PLOTS:
        path = root / "reports" / "plots" / name
        if path.exists():
            files.append(File.generated(config, f"assets/{name}", abs_src_path=str(path)))
    return files
