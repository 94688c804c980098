from apex_serve.cli import main

main()
