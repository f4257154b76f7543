#include "benchmarks/harness/process.hpp"

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <poll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

namespace bench {

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string tail_file(const std::string& path, int lines, const std::string& skip) {
  std::istringstream in(read_file(path));
  std::vector<std::string> kept;
  std::string line;
  while (std::getline(in, line)) {
    if (!skip.empty() && line.find(skip) != std::string::npos)
      continue;
    kept.push_back(line);
    if (kept.size() > static_cast<std::size_t>(lines))
      kept.erase(kept.begin());
  }
  std::string out;
  for (const auto& l : kept)
    out += l + "\n";
  return out;
}

int http_get(const std::string& host, uint16_t port, const std::string& path, int timeout_ms,
             std::string& body) {
  body.clear();
  sockaddr_in a {};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  if (::inet_pton(AF_INET, host.c_str(), &a.sin_addr) != 1)
    return -1;
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return -1;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  auto wait_for = [&](short events) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                  deadline - std::chrono::steady_clock::now())
                  .count();
    if (left <= 0)
      return false;
    pollfd p {fd, events, 0};
    return ::poll(&p, 1, static_cast<int>(left)) == 1 && (p.revents & (events | POLLHUP));
  };
  int status = -1;
  do {
    if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
      if (errno != EINPROGRESS || !wait_for(POLLOUT))
        break;
      int err = 0;
      socklen_t len = sizeof err;
      if (::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0 || err != 0)
        break;
    }
    std::string req = "GET " + path + " HTTP/1.1\r\nHost: " + host + ":" + std::to_string(port)
                      + "\r\nConnection: close\r\n\r\n";
    std::size_t sent = 0;
    bool ok = true;
    while (ok && sent < req.size()) {
      ssize_t n = ::send(fd, req.data() + sent, req.size() - sent, MSG_NOSIGNAL);
      if (n > 0)
        sent += static_cast<std::size_t>(n);
      else if (n < 0 && errno == EAGAIN)
        ok = wait_for(POLLOUT);
      else
        ok = false;
    }
    if (!ok)
      break;
    std::string resp;
    char buf[4096];
    while (true) {
      ssize_t n = ::recv(fd, buf, sizeof buf, 0);
      if (n > 0)
        resp.append(buf, static_cast<std::size_t>(n));
      else if (n == 0)
        break;
      else if (errno != EAGAIN || !wait_for(POLLIN))
        break;
    }
    // "HTTP/1.1 200 OK\r\n...\r\n\r\nbody" (Connection: close, so the body runs to EOF).
    if (resp.rfind("HTTP/1.", 0) != 0 || resp.size() < 12)
      break;
    status = std::atoi(resp.c_str() + 9);
    auto hdr_end = resp.find("\r\n\r\n");
    if (hdr_end != std::string::npos)
      body = resp.substr(hdr_end + 4);
  } while (false);
  ::close(fd);
  return status;
}

bool file_exists(const std::string& path) {
  return ::access(path.c_str(), F_OK) == 0;
}

namespace {

/// utime + stime in seconds from a /proc/.../stat line whose "(comm)" ends
/// at `rparen`. Fields after it: state(3) ppid(4) ... utime(14) stime(15).
double stat_cpu_seconds(const std::string& stat, std::size_t rparen) {
  static const double tick = static_cast<double>(::sysconf(_SC_CLK_TCK));
  std::istringstream in(stat.substr(rparen + 2));
  std::string field;
  unsigned long long utime = 0, stime = 0;
  for (int i = 3; i <= 15 && in >> field; ++i) {
    if (i == 14)
      utime = std::strtoull(field.c_str(), nullptr, 10);
    if (i == 15)
      stime = std::strtoull(field.c_str(), nullptr, 10);
  }
  return static_cast<double>(utime + stime) / tick;
}

} // namespace

proc_sample sample_process(pid_t pid) {
  proc_sample s;
  auto stat = read_file("/proc/" + std::to_string(pid) + "/stat");
  auto rparen = stat.rfind(')');
  if (stat.empty() || rparen == std::string::npos)
    return s;
  s.cpu_seconds = stat_cpu_seconds(stat, rparen);
  std::istringstream status(read_file("/proc/" + std::to_string(pid) + "/status"));
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmRSS:", 0) == 0)
      s.rss_kb = std::strtoull(line.c_str() + 6, nullptr, 10);
    else if (line.rfind("VmHWM:", 0) == 0)
      s.hwm_kb = std::strtoull(line.c_str() + 6, nullptr, 10);
  }
  s.ok = true;
  return s;
}

proc_sample sample_process_tree(pid_t pid) {
  proc_sample total = sample_process(pid);
  if (!total.ok)
    return total;
  DIR* d = ::opendir("/proc");
  if (d == nullptr)
    return total;
  while (auto* e = ::readdir(d)) {
    char* end = nullptr;
    long child = std::strtol(e->d_name, &end, 10);
    if (child <= 0 || *end != '\0')
      continue;
    auto stat = read_file(std::string("/proc/") + e->d_name + "/stat");
    auto rparen = stat.rfind(')');
    if (rparen == std::string::npos || rparen + 4 > stat.size())
      continue;
    std::istringstream in(stat.substr(rparen + 2));
    std::string state;
    long ppid = 0;
    in >> state >> ppid;
    if (ppid != pid)
      continue;
    auto c = sample_process(static_cast<pid_t>(child));
    if (c.ok) {
      total.cpu_seconds += c.cpu_seconds;
      total.rss_kb += c.rss_kb;
      total.hwm_kb += c.hwm_kb;
    }
  }
  ::closedir(d);
  return total;
}

machine_sample sample_machine() {
  machine_sample m;
  std::istringstream in(read_file("/proc/stat"));
  std::string cpu;
  in >> cpu;
  if (cpu != "cpu")
    return m;
  unsigned long long v[10] = {};
  for (auto& x : v)
    in >> x;
  static const double tick = static_cast<double>(::sysconf(_SC_CLK_TCK));
  unsigned long long total = 0;
  for (int i = 0; i < 8; ++i) // guest time is already inside user
    total += v[i];
  unsigned long long idle = v[3] + v[4];
  m.total = static_cast<double>(total) / tick;
  m.busy = static_cast<double>(total - idle) / tick;
  return m;
}

std::string load_average() {
  std::istringstream in(read_file("/proc/loadavg"));
  std::string a, b, c;
  in >> a >> b >> c;
  return a + " " + b + " " + c;
}

std::string machine_description() {
  std::string model;
  std::istringstream cpuinfo(read_file("/proc/cpuinfo"));
  std::string line;
  while (std::getline(cpuinfo, line))
    if (line.rfind("model name", 0) == 0) {
      model = line.substr(line.find(':') + 2);
      break;
    }
  long cores = ::sysconf(_SC_NPROCESSORS_ONLN);
  unsigned long long mem_kb = 0;
  std::istringstream meminfo(read_file("/proc/meminfo"));
  while (std::getline(meminfo, line))
    if (line.rfind("MemTotal:", 0) == 0)
      mem_kb = std::strtoull(line.c_str() + 9, nullptr, 10);
  struct utsname u {};
  ::uname(&u);
  char mem[32];
  std::snprintf(mem, sizeof mem, "%.1f GiB", static_cast<double>(mem_kb) / (1024.0 * 1024.0));
  return std::to_string(cores) + " x " + (model.empty() ? "unknown CPU" : model) + ", " + mem
         + ", Linux " + u.release;
}

double self_cpu_seconds() {
  struct rusage ru {};
  ::getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec)
         + static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

namespace {

/// (name, utime + stime in seconds) of /proc/self/task/TID; false when gone.
bool read_thread(const std::string& tid, std::string& name, double& cpu) {
  auto stat = read_file("/proc/self/task/" + tid + "/stat");
  auto lparen = stat.find('('), rparen = stat.rfind(')');
  if (lparen == std::string::npos || rparen == std::string::npos || rparen < lparen)
    return false;
  name = stat.substr(lparen + 1, rparen - lparen - 1);
  cpu = stat_cpu_seconds(stat, rparen);
  return true;
}

std::vector<std::string> self_tids() {
  std::vector<std::string> out;
  DIR* d = ::opendir("/proc/self/task");
  if (d == nullptr)
    return out;
  while (auto* e = ::readdir(d))
    if (e->d_name[0] != '.')
      out.emplace_back(e->d_name);
  ::closedir(d);
  return out;
}

} // namespace

double self_threads_cpu_seconds(const std::string& prefix) {
  double total = 0, cpu = 0;
  std::string name;
  for (const auto& tid : self_tids())
    if (read_thread(tid, name, cpu) && name.compare(0, prefix.size(), prefix) == 0)
      total += cpu;
  return total;
}

std::vector<long> self_thread_ids(const std::string& prefix) {
  std::vector<long> out;
  double cpu = 0;
  std::string name;
  for (const auto& tid : self_tids())
    if (read_thread(tid, name, cpu) && name.compare(0, prefix.size(), prefix) == 0)
      out.push_back(std::stol(tid));
  return out;
}

double self_threads_cpu_seconds(const std::vector<long>& tids) {
  double total = 0, cpu = 0;
  std::string name;
  for (long tid : tids)
    if (read_thread(std::to_string(tid), name, cpu))
      total += cpu;
  return total;
}

child_process::~child_process() {
  if (pid_ > 0) {
    ::kill(pid_, SIGKILL);
    int st = 0;
    ::waitpid(pid_, &st, 0);
  }
}

bool child_process::start(const std::vector<std::string>& argv, const std::string& log_file,
                          std::string& err) {
  std::vector<char*> args;
  for (const auto& a : argv)
    args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  const pid_t parent = ::getpid();
  pid_t pid = ::fork();
  if (pid < 0) {
    err = std::string("fork: ") + std::strerror(errno);
    return false;
  }
  if (pid == 0) {
    int fd = ::open(log_file.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) {
      ::dup2(fd, 1);
      ::dup2(fd, 2);
      ::close(fd);
    }
    int devnull = ::open("/dev/null", O_RDONLY);
    if (devnull >= 0)
      ::dup2(devnull, 0);
    // Our own signal mask must not leak into the server.
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    ::signal(SIGPIPE, SIG_DFL);
    ::setpgid(0, 0); // Ctrl-C on the harness must not stop the server mid-run
    // ...but a harness that dies without cleaning up (SIGKILL, a crash, a
    // ctest timeout) must not leave servers behind.
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent)
      ::_exit(127);
    ::execv(args[0], args.data());
    ::_exit(127);
  }
  pid_ = pid;
  status_ = -1;
  return true;
}

bool child_process::alive() {
  if (pid_ <= 0)
    return false;
  int st = 0;
  pid_t r = ::waitpid(pid_, &st, WNOHANG);
  if (r == 0)
    return true;
  if (r == pid_)
    reaped(st);
  pid_ = -1;
  return false;
}

void child_process::reaped(int st) {
  status_ = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  signal_ = WIFSIGNALED(st) ? WTERMSIG(st) : 0;
}

std::string child_process::describe_exit() const {
  if (signal_ != 0) {
    const char* name = ::strsignal(signal_);
    return "was killed by signal " + std::to_string(signal_) + (name ? " (" + std::string(name) + ")" : "");
  }
  return "exited with status " + std::to_string(status_);
}

void child_process::terminate() {
  if (pid_ > 0)
    ::kill(pid_, SIGTERM);
}

int child_process::stop(int grace_s) {
  if (pid_ <= 0)
    return status_;
  ::kill(pid_, SIGTERM);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(grace_s);
  int st = 0;
  while (true) {
    pid_t r = ::waitpid(pid_, &st, WNOHANG);
    if (r == pid_)
      break;
    if (std::chrono::steady_clock::now() > deadline) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, &st, 0);
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  pid_ = -1;
  reaped(st);
  return status_;
}

std::string make_temp_dir(const std::string& prefix) {
  std::string tmpl = "/tmp/" + prefix + "-XXXXXX";
  char* p = ::mkdtemp(tmpl.data());
  return p ? std::string(p) : std::string{};
}

void remove_tree(const std::string& path) {
  if (path.size() > 5 && path.rfind("/tmp/", 0) == 0 && path.find('\'') == std::string::npos)
    if (std::system(("rm -rf '" + path + "'").c_str()) != 0)
      std::fprintf(stderr, "provisiond-bench: could not remove %s\n", path.c_str());
}

uint16_t pick_free_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0)
    return 0;
  sockaddr_in a {};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  uint16_t port = 0;
  socklen_t len = sizeof a;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0
      && ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0)
    port = ntohs(a.sin_port);
  ::close(fd);
  return port;
}

std::string self_dir() {
  char buf[4096];
  ssize_t n = ::readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0)
    return ".";
  std::string p(buf, static_cast<std::size_t>(n));
  auto slash = p.rfind('/');
  return slash == std::string::npos ? "." : p.substr(0, slash);
}

} // namespace bench
