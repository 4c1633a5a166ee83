"""A bundle's `__main__.py`: `python3 BUNDLE ARGS` does what `./BUNDLE ARGS` does.

For where a file cannot be executed (a noexec mount, Windows, a locked-down
server). Python runs this from the zip with the bundle first on sys.path; the
bootstrap beside it does the rest, exactly as the launcher has it do. Written
for any Python 3, so that an old one gets a clear line rather than a
SyntaxError. (A bundle over 4 GiB is ZIP64, which Python's zip importer reads
only from 3.13 on: older ones never get here, and say they find no __main__.)
"""

import sys

if sys.version_info < (3, 10):
    sys.exit("error: this llamazip bundle needs Python 3.10 or newer; this is Python %d.%d"
             % sys.version_info[:2])

bundle = sys.argv[0]
import bootstrap  # noqa: E402  (from the zip itself)

# The runtime imports nothing from the zip: the bootstrap puts the unpacked tree first.
sys.path[:] = [p for p in sys.path if p != bundle]
bootstrap.main([bundle] + sys.argv[1:])
