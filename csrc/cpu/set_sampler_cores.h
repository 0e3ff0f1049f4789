// The fused set sampler's load check (included once, by set_sampler.cpp, inside its anonymous namespace):
// whether a team of threads would each find a core, not counting this process's own runnable threads.
// Uses what set_sampler.cpp includes before it (dirent.h, sys/syscall.h, unistd.h, atomic, chrono, cstdio).
#pragma once

// Runnable threads of this process other than the caller (/proc/self/task/*/stat, state R), or -1.
long own_running_others() {
  DIR* dir = opendir("/proc/self/task");
  if (dir == nullptr) return -1;
  const long self = static_cast<long>(syscall(SYS_gettid));
  long n = 0;
  char path[64], buf[256];
  while (const dirent* e = readdir(dir)) {
    if (e->d_name[0] < '0' || e->d_name[0] > '9' || std::atol(e->d_name) == self) continue;
    std::snprintf(path, sizeof path, "/proc/self/task/%s/stat", e->d_name);
    FILE* f = std::fopen(path, "r");
    if (f == nullptr) continue;
    const size_t got = std::fread(buf, 1, sizeof buf - 1, f);
    std::fclose(f);
    buf[got] = '\0';
    const char* close = std::strrchr(buf, ')');  // "tid (comm) S ...": the state follows the last ')'
    if (close != nullptr && close[1] == ' ' && close[2] == 'R') ++n;
  }
  closedir(dir);
  return n;
}

// Whether `threads` threads would each find a core: the runnable tasks of /proc/loadavg (field 4, which
// counts the calling thread) plus the threads must fit in the online CPUs. Mode 2 synchronises ~6 times
// per block, and on a busy machine every barrier can cost a time slice (measured on the shared 2-core
// machine with ~8 runnable tasks: 2.7x slower than one thread at B = 1). This process's own runnable
// threads (an OpenMP worker still finishing the previous region, a Python thread) are not load: they are
// subtracted when the quick count says busy (else, on an idle machine, an OpenMP worker that had not yet
// gone to sleep sent batch 1 to one thread in most calls). Without /proc: assume idle.
bool cores_idle(int threads) {
  const long cpus = sysconf(_SC_NPROCESSORS_ONLN);
  FILE* f = std::fopen("/proc/loadavg", "r");
  if (f == nullptr || cpus <= 0) {
    if (f != nullptr) std::fclose(f);
    return true;
  }
  double l1 = 0, l5 = 0, l15 = 0;
  long running = 0, total = 0;
  const int got = std::fscanf(f, "%lf %lf %lf %ld/%ld", &l1, &l5, &l15, &running, &total);
  std::fclose(f);
  if (got != 5 || running < 1) return true;
  if ((running - 1) + threads <= cpus) return true;
  // The slow count (~0.2 ms: a /proc read per thread of the process) is reused for 100 ms.
  static std::atomic<int64_t> stamp{-1};
  static std::atomic<long> own_cached{0};
  const int64_t now = std::chrono::duration_cast<std::chrono::milliseconds>(
                          std::chrono::steady_clock::now().time_since_epoch())
                          .count();
  const int64_t last = stamp.load(std::memory_order_relaxed);
  long own;
  if (last >= 0 && now - last < 100) {
    own = own_cached.load(std::memory_order_relaxed);
  } else {
    own = own_running_others();
    own_cached.store(own, std::memory_order_relaxed);
    stamp.store(now, std::memory_order_relaxed);
  }
  return own > 0 && (running - 1 - own) + threads <= cpus;
}
