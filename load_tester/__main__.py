from gridcommon.logs import configure_logging
from load_tester.cli import main

# Only warnings: the progress bar and the summary are the tool's normal output.
configure_logging("load_tester", "WARNING")
raise SystemExit(main())
