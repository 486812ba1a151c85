"""Rebuild vendor/vega/plots_template.html: DVC's plots page with vega, vega-lite and vega-embed inlined.

`dvc plots show` writes an HTML page whose default template loads these three libraries from a CDN,
so the page is blank with no network. .dvc/config points `plots.html_template` at this template
instead: the same page with the libraries' minified builds (from the npm packages pinned below) in
<script> tags, so every page DVC writes carries its chart library. DVC fills `{plot_divs}` and
`{refresh_tag}`; the template has no `{scripts}` placeholder, so DVC's CDN tags never go in.

Run (needs npm and the npm registry; the output is committed, so users and CI never run it):
    python scripts/vendor_vega.py
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

# The major versions DVC's own template loads (dvc_render: vega 5, vega-lite 5, vega-embed 6), at
# the newest release of each when vendored. DVC's specs are vega-lite v5 JSON.
PACKAGES = (("vega", "5.33.1", "build/vega.min.js"),
            ("vega-lite", "5.23.0", "build/vega-lite.min.js"),
            ("vega-embed", "6.29.0", "build/vega-embed.min.js"))
OUT = Path(__file__).resolve().parent.parent / "vendor" / "vega" / "plots_template.html"

PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- vega, vega-lite and vega-embed inlined (BSD-3-Clause, vendor/vega/LICENSE); rebuilt by
         scripts/vendor_vega.py. No network needed to draw the plots. -->
{scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def script_tag(name: str, version: str, code: str) -> str:
    """One inline <script>; refuses code that would end the tag early or hold a DVC placeholder."""
    for bad in ("</script", "{plot_divs}", "{refresh_tag}", "{scripts}"):
        if bad in code.lower():
            raise ValueError(f"{name}@{version}: the build contains {bad!r}; it cannot be inlined as is")
    # The source-map comment would point a browser's developer tools at a file that is not shipped.
    code = "\n".join(line for line in code.splitlines() if not line.startswith("//# sourceMappingURL="))
    return f"    <script>/* {name}@{version}, BSD-3-Clause */\n{code.strip()}\n    </script>"


def page(scripts: list[str]) -> str:
    return PAGE.format(scripts="\n".join(scripts))


def main() -> int:
    tags = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, version, build in PACKAGES:
            subprocess.run(["npm", "pack", "--silent", f"{name}@{version}"], cwd=tmp, check=True,
                           stdout=subprocess.DEVNULL)
            with tarfile.open(Path(tmp) / f"{name}-{version}.tgz") as tar:
                code = tar.extractfile(f"package/{build}").read().decode("utf-8")
            tags.append(script_tag(name, version, code))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = OUT.with_suffix(".tmp")
    tmp_out.write_text(page(tags), encoding="utf-8")
    tmp_out.replace(OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
