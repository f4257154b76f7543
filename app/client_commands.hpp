#pragma once
// Client-side subcommands of the provisiond binary: enrollment management over
// the DPS service API, a one-shot device registration, and the assignment
// event feed. They talk HTTPS to a running server like any SDK would.

namespace CLI {
class App;
}

/// Registers `enrollment`, `group`, `certificate`, `registration`, `assignments` and
/// `register` on `app`. A subcommand that runs stores its process exit status
/// in `exit_code` (0 ok, 1 failure; errors go to stderr as
/// "error: <errorCode> <message>"). Never throws once parsing is done.
void add_client_commands(CLI::App& app, int& exit_code);
