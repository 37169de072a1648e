#include "common/status.h"

#include <gtest/gtest.h>

namespace sps {
namespace {

Result<int> half(int x) {
  if (x % 2 != 0) return invalid_argument("odd");
  return x / 2;
}

Status quarter(int x, int& out) {
  SPS_ASSIGN_OR_RETURN(int h, half(x));
  SPS_ASSIGN_OR_RETURN(out, half(h));
  return {};
}

TEST(StatusTest, OkAndErrors) {
  EXPECT_TRUE(Status().ok());
  Status s = malformed("bad frame");
  EXPECT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kMalformed);
  EXPECT_EQ(s.to_string(), "MALFORMED: bad frame");
  EXPECT_EQ(s.with_context("server 1").message(), "server 1: bad frame");
}

TEST(StatusTest, ResultPropagates) {
  int out = 0;
  EXPECT_TRUE(quarter(8, out).ok());
  EXPECT_EQ(out, 2);
  Status s = quarter(6, out);  // 6 -> 3 -> odd
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  Result<int> r = Status();  // an OK status is not a value: becomes internal
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInternal);
}

}  // namespace
}  // namespace sps
