import ctypes, sys
if len(sys.argv) > 1:
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    print("mallopt", libc.mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024), libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
exec(open("perf_study/int8_eager.py").read())
