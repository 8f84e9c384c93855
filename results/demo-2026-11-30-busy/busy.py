"""A CPU-bound neighbour: one thread, busy for `duty` of every 100 ms (1.0 = a full core)."""
import sys, time
duty = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
while True:
    t = time.perf_counter()
    while time.perf_counter() - t < 0.1 * duty:
        pass
    if duty < 1:
        time.sleep(0.1 * (1 - duty))
