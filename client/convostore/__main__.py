"""`python -m convostore` is the `convostore` command, whose home is `convostore_cli`."""

import sys

from convostore_cli.main import main

sys.exit(main())
