-- No own arguments. Every job id in the index, from one consistent snapshot:
-- {ready ids, leased ids, delayed ids, dead ids}.
return {
  redis.call('ZRANGE', READY, 0, -1),
  redis.call('ZRANGE', LEASED, 0, -1),
  redis.call('ZRANGE', DELAYED, 0, -1),
  redis.call('ZRANGE', DEAD, 0, -1),
}
