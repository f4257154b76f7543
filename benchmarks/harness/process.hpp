#pragma once
// Child processes (the provisiond server, the nginx reference) and what the
// harness reads about processes from /proc.

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

namespace bench {

/// CPU and memory of one process, from /proc/PID/stat and /proc/PID/status.
struct proc_sample {
  bool ok = false;
  double cpu_seconds = 0; ///< utime + stime (all threads, reaped children excluded)
  uint64_t rss_kb = 0;    ///< VmRSS
  uint64_t hwm_kb = 0;    ///< VmHWM (peak RSS over the process lifetime)
};
proc_sample sample_process(pid_t pid);
/// Sums sample_process over a pid and its direct children (nginx master + workers).
proc_sample sample_process_tree(pid_t pid);

/// Machine-wide CPU time from /proc/stat (all cores, in seconds).
struct machine_sample {
  double busy = 0;
  double total = 0;
};
machine_sample sample_machine();
std::string load_average(); ///< first three fields of /proc/loadavg
std::string machine_description(); ///< CPU model, cores, memory, kernel

/// CPU seconds used by this process (getrusage, user + system).
double self_cpu_seconds();
/// CPU seconds (utime + stime) of this process's live threads whose name
/// (/proc/self/task/TID/comm) starts with `prefix`. Threads that already
/// exited are not counted.
double self_threads_cpu_seconds(const std::string& prefix);
/// Ids of this process's live threads whose name starts with `prefix`.
std::vector<long> self_thread_ids(const std::string& prefix);
/// As above, over the threads `tids` that are still alive.
double self_threads_cpu_seconds(const std::vector<long>& tids);

/// A child started with fork+exec; stdout/stderr go to `log_file`.
class child_process {
public:
  child_process() = default;
  ~child_process(); // SIGKILL + reap if still running
  child_process(const child_process&) = delete;
  child_process& operator=(const child_process&) = delete;

  /// Starts argv[0] with the arguments. Returns false with `err` set when
  /// fork fails; exec failures show up as an early exit (status 127).
  bool start(const std::vector<std::string>& argv, const std::string& log_file,
             std::string& err);
  bool alive();
  /// Sends SIGTERM and returns (stop() then waits); lets several children
  /// shut down in parallel.
  void terminate();
  /// SIGTERM, waits up to `grace_s`, then SIGKILL. Returns the exit status
  /// (-1 when killed by a signal).
  int stop(int grace_s = 30);
  pid_t pid() const { return pid_; }
  int exit_status() const { return status_; }
  /// "exited with status N" or "was killed by signal N (NAME)", once it ended.
  std::string describe_exit() const;

private:
  void reaped(int wait_status);
  pid_t pid_ = -1;
  int status_ = -1;
  int signal_ = 0; ///< the signal that ended it, 0 = exited
};

std::string read_file(const std::string& path);
/// The last `lines` lines of a file, leaving out lines that contain `skip`
/// (when not empty).
std::string tail_file(const std::string& path, int lines, const std::string& skip = {});
/// Plain HTTP/1.1 GET on 127.0.0.1-style addresses (the metrics listener).
/// Returns the status code, or -1 when the connection or read failed.
int http_get(const std::string& host, uint16_t port, const std::string& path, int timeout_ms,
             std::string& body);
bool file_exists(const std::string& path);
std::string make_temp_dir(const std::string& prefix);
void remove_tree(const std::string& path); ///< only under /tmp
/// A TCP port on 127.0.0.1 that was free a moment ago (bind to :0, close).
uint16_t pick_free_port();
/// Directory of the running executable (/proc/self/exe).
std::string self_dir();

} // namespace bench
