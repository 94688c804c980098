"""apex-serve's tools: the `apex-serve` command, the local launcher, the in-process engine, the default model, the
profiling CLI, the OTLP receiver and trace report, the benchmarks and the simulator. They sit above the services and
import them; nothing below imports this package."""
