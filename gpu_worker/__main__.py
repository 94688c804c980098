from gpu_worker.server import main

main()
