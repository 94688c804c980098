from cpu_attention_worker.server import main

main()
