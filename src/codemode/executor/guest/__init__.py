"""The guest: the only code that runs inside the sandbox.

Standard library only, and nothing of the ``codemode`` package: inside the sandbox this folder
is bound read-only at ``/codemode/guest`` and imported as the top-level package ``guest``, so
its modules import one another relatively. :mod:`.runtime` runs one program,
:mod:`.tools` relays its tool calls, :mod:`.protocol` frames the channel, :mod:`.outcomes`
names the error types, and :mod:`.zygote` is the fork server's process. The service imports
the same files as ``codemode.executor.guest``.
"""

import os

#: This folder on the host: what a sandbox binds, and what ``python -I -S -B`` runs.
GUEST_DIR = os.path.dirname(os.path.realpath(__file__))
