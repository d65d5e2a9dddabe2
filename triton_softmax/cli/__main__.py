"""``python -m triton_softmax.cli``: the ``triton-softmax`` command."""

import sys

from triton_softmax.cli import main

sys.exit(main())
