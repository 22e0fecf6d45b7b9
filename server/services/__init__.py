"""Services: the work behind each route (encode, schedule, guard, shape the response)."""
