import sys

from apex_serve.logs import configure_logging
from apex_tools.trace_report.cli import main

configure_logging("trace-report")
sys.exit(main())
