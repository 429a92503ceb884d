"""Allow ``python -m robaudit``."""

from robaudit.cli import main

main()
