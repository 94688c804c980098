from scheduler_service.server import main

main()
