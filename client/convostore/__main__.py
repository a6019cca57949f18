"""`python -m convostore` is the `convostore` command."""

import sys

from .cli import main

sys.exit(main())
