from apex_tools.cli import main

main()
