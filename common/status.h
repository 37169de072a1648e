// Status and Result<T>: the error model for untrusted input and the data path.
//
// A Status is either OK or carries a canonical code plus a message with the
// context a user can act on (file:line:key for configs, peer and message type
// for the wire). Result<T> holds a value or a non-OK Status; it is shaped like
// std::expected so it can be swapped for it later. Both are [[nodiscard]].
// Exceptions are for setup only (see docs/errors.md); bugs use SPS_CHECK.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace sps {

enum class StatusCode {
  kOk = 0,
  kInvalidArgument,     // the caller's input is wrong (config value, CLI flag)
  kOutOfRange,          // an index, count or value outside its valid range
  kMalformed,           // bytes that do not parse (wire frames, files)
  kUnavailable,         // a peer or resource cannot be reached now
  kDeadlineExceeded,    // a wait ran past its timeout
  kResourceExhausted,   // a bound (memory, queue, count) would be exceeded
  kFailedPrecondition,  // the system is not in the state the call needs
  kInternal,            // an invariant broke; a bug
};

std::string_view status_code_name(StatusCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;  // OK
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status ok_status() { return {}; }
  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }
  // "CODE: message", or "OK".
  std::string to_string() const;
  // Prepends context ("while loading x: ") to a non-OK status.
  Status with_context(std::string_view context) const;

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

inline Status invalid_argument(std::string m) { return {StatusCode::kInvalidArgument, std::move(m)}; }
inline Status out_of_range(std::string m) { return {StatusCode::kOutOfRange, std::move(m)}; }
inline Status malformed(std::string m) { return {StatusCode::kMalformed, std::move(m)}; }
inline Status unavailable(std::string m) { return {StatusCode::kUnavailable, std::move(m)}; }
inline Status deadline_exceeded(std::string m) { return {StatusCode::kDeadlineExceeded, std::move(m)}; }
inline Status resource_exhausted(std::string m) { return {StatusCode::kResourceExhausted, std::move(m)}; }
inline Status failed_precondition(std::string m) { return {StatusCode::kFailedPrecondition, std::move(m)}; }
inline Status internal_error(std::string m) { return {StatusCode::kInternal, std::move(m)}; }

template <class T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}  // NOLINT: implicit like std::expected
  Result(Status status) : v_(std::move(status)) {  // NOLINT
    if (std::get<Status>(v_).ok()) v_ = Status(StatusCode::kInternal, "Result built from an OK status");
  }
  bool ok() const { return std::holds_alternative<T>(v_); }
  explicit operator bool() const { return ok(); }
  const Status& status() const {
    static const Status kOkStatus;
    return ok() ? kOkStatus : std::get<Status>(v_);
  }
  T& value() & { return std::get<T>(v_); }
  const T& value() const& { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

 private:
  std::variant<T, Status> v_;
};

namespace detail {
[[noreturn]] void check_failed(const char* file, int line, const char* expr, const std::string& detail);
}  // namespace detail

}  // namespace sps

#define SPS_STATUS_CONCAT_INNER(a, b) a##b
#define SPS_STATUS_CONCAT(a, b) SPS_STATUS_CONCAT_INNER(a, b)

#define SPS_RETURN_IF_ERROR(expr)                      \
  do {                                                 \
    ::sps::Status sps_status_ = (expr);                \
    if (!sps_status_.ok()) return sps_status_;         \
  } while (0)

#define SPS_ASSIGN_OR_RETURN(lhs, expr) \
  SPS_ASSIGN_OR_RETURN_IMPL(SPS_STATUS_CONCAT(sps_result_, __LINE__), lhs, expr)
#define SPS_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                              \
  if (!tmp.ok()) return tmp.status();             \
  lhs = std::move(tmp).value()

// Invariant checks for bugs only; never reachable from peer bytes or user files.
#define SPS_CHECK(cond)                                                          \
  do {                                                                           \
    if (!(cond)) ::sps::detail::check_failed(__FILE__, __LINE__, #cond, {});     \
  } while (0)
#define SPS_CHECK_MSG(cond, msg)                                                 \
  do {                                                                           \
    if (!(cond)) ::sps::detail::check_failed(__FILE__, __LINE__, #cond, (msg));  \
  } while (0)
#ifdef NDEBUG
#define SPS_DCHECK(cond) \
  do {                   \
  } while (0)
#else
#define SPS_DCHECK(cond) SPS_CHECK(cond)
#endif
