#!/bin/sh
# A llamazip bundle: this POSIX sh launcher, then a zip archive holding a
# language model and the Python runtime that runs it (`unzip -l` lists it).
# It needs a python3 >= 3.10; LLAMAZIP_PYTHON names a particular one.
# The launcher reads nothing from stdin: the chat keeps it. (`python3 FILE` runs
# the zip's __main__.py instead, on Python 3.13+ for bundles over 4 GiB.)
# Python starts with -S (no site-packages): the bundle carries all it imports,
# nothing installed on the host can change or shadow it, and a start is ~5 ms
# instead of ~25 (site scans every .pth file). A bundle built --no-deps brings
# no packages: its bootstrap adds site-packages back.
stub='import sys, zipfile
bundle = sys.argv[1]
try:
    with zipfile.ZipFile(bundle) as z:
        source = z.read("bootstrap.py")
except Exception as e:
    sys.exit("error: %s: not a readable llamazip bundle (%s)" % (bundle, e))
exec(compile(source, bundle + "/bootstrap.py", "exec"))'
usable() {
  command -v "$1" >/dev/null 2>&1 &&
    "$1" -S -c 'import sys; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1 </dev/null
}
if [ -n "${LLAMAZIP_PYTHON:-}" ]; then
  usable "$LLAMAZIP_PYTHON" || {
    echo "error: LLAMAZIP_PYTHON=$LLAMAZIP_PYTHON is not a python >= 3.10" >&2
    exit 127
  }
  exec "$LLAMAZIP_PYTHON" -S -c "$stub" "$0" "$@"
fi
for py in python3 python3.14 python3.13 python3.12 python3.11 python3.10 python; do
  usable "$py" && exec "$py" -S -c "$stub" "$0" "$@"
done
echo "error: this llamazip bundle needs python3 >= 3.10, and none was found (set LLAMAZIP_PYTHON)" >&2
exit 127
