from profiler_service.server import main

main()
