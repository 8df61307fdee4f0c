# A program as a model would write it: it prints, computes, and sets `result`.
import statistics

readings = [12.5, 13.1, 12.9, 14.2, 13.7]
print(f"{len(readings)} readings, max {max(readings)}")
result = {
    "mean": round(statistics.mean(readings), 2),
    "stdev": round(statistics.stdev(readings), 2),
}
