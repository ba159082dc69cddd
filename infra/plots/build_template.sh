#!/usr/bin/env bash
# Rebuild offline.html: DVC's HTML page with vega, vega-lite and vega-embed inlined (DVC's default page loads them
# from a CDN, so `dvc plots show` renders nothing offline). Needs npm; run from anywhere.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
npm pack --silent vega@5.33.1 vega-lite@5.23.0 vega-embed@6.29.0 >/dev/null
for f in *.tgz; do mkdir "${f%.tgz}"; tar xzf "$f" -C "${f%.tgz}"; done
python3 - "$here/offline.html" <<'PY'
import glob, sys
parts = []
for name in ("vega", "vega-lite", "vega-embed"):
    [path] = glob.glob(f"{name}-[0-9]*/package/build/{name}.min.js")
    parts.append(f"<script>/* {name} (BSD-3-Clause, see infra/plots/LICENSES) */\n{open(path).read()}\n</script>")
head = "    {refresh_tag}\n    <meta charset=\"utf-8\">\n    <title>llama2-recipe: DVC plots</title>\n"
page = ("<!DOCTYPE html>\n<html>\n<head>\n" + head + "\n".join(parts) +
        "\n    <style>table { border-spacing: 15px; } body { font-family: sans-serif; }</style>\n</head>\n<body>\n"
        "    {plot_divs}\n</body>\n</html>\n")
open(sys.argv[1], "w").write(page)
PY
echo "wrote $here/offline.html"
