// The tiny check harness the ctest executables share: count failures, report each one.
#pragma once

#include <exception>
#include <functional>
#include <iostream>
#include <string>

namespace sar_fast_test {

inline int failures = 0;

inline void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::cerr << "FAIL: " << what << "\n";
  }
}

// `call` must throw exactly an `Error` (e.g. c10::ValueError), not another exception.
template <typename Error>
void expect_throws(const std::string& what, const std::function<void()>& call) {
  try {
    call();
  } catch (const Error&) {
    return;
  } catch (const std::exception& e) {
    expect(false, what + ": wrong exception type: " + e.what());
    return;
  }
  expect(false, what + ": no exception");
}

}  // namespace sar_fast_test
